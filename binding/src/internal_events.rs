//! Telemetry of the binding's producer and AMQP transport: each event is a struct whose
//! `emit` logs and counts in one place (vector's `internal_events`), like every service's
//! own `internal_events` module.
//!
//! Labels are bounded: `error` (publish error kinds, [`crate::transport::PublishError::kind`]),
//! `broker` (the configured broker URLs, passwords removed), `role` (`publish` or
//! `consume`) and `queue` (the topology's queues). Nothing here runs per reading.
//!
//! The producer's metrics keep their `sluice_ingest_` prefix: ingest is the producer's main
//! user, and the names are what dashboards and alerts already query.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Batches the broker confirmed.
pub const BATCHES_PUBLISHED_TOTAL: &str = "sluice_ingest_batches_published_total";
/// Publish attempts that failed, by `error` kind (retried attempts included).
pub const PUBLISH_FAILURES_TOTAL: &str = "sluice_ingest_publish_failures_total";
/// Time from publish to broker confirm of a batch (successful attempts).
pub const PUBLISH_CONFIRM_SECONDS: &str = "sluice_ingest_publish_confirm_seconds";
/// Readings per confirmed batch.
pub const BATCH_READINGS: &str = "sluice_ingest_batch_readings";
/// 1 while the connection of `role` to `broker` is up, else 0.
pub const BROKER_CONNECTED: &str = "sluice_broker_connected";
/// Connections to `broker` in `role` made again after a loss.
pub const BROKER_RECONNECTS_TOTAL: &str = "sluice_broker_reconnects_total";
/// 1 while `broker` blocks publishing (memory or disk alarm), else 0.
pub const BROKER_BLOCKED: &str = "sluice_broker_blocked";
/// Publishing channels the broker closed and the transport replaced, by `broker`.
pub const BROKER_CHANNELS_REPLACED_TOTAL: &str = "sluice_broker_channels_replaced_total";
/// Declarations refused because the object exists with other arguments (kept as it is).
pub const BROKER_DECLARATIONS_KEPT_TOTAL: &str = "sluice_broker_declarations_kept_total";
/// Consumers that subscribed again after a reconnect or a broker-side cancel, by `queue`.
pub const CONSUMER_RESUBSCRIBED_TOTAL: &str = "sluice_consumer_resubscribed_total";

/// The broker confirmed a batch.
#[derive(Debug)]
pub(crate) struct BatchPublished {
    pub(crate) readings: usize,
    pub(crate) confirm: Duration,
}

impl BatchPublished {
    pub(crate) fn emit(self) {
        tracing::trace!(readings = self.readings, confirm = ?self.confirm, "batch confirmed");
        counter!(BATCHES_PUBLISHED_TOTAL).increment(1);
        histogram!(PUBLISH_CONFIRM_SECONDS).record(self.confirm.as_secs_f64());
        histogram!(BATCH_READINGS).record(self.readings as f64);
    }
}

/// A publish attempt failed; `will_retry` says whether the producer tries again.
#[derive(Debug)]
pub(crate) struct PublishFailed<'a> {
    pub(crate) error: &'static str,
    pub(crate) detail: &'a dyn std::error::Error,
    pub(crate) attempt: u32,
    pub(crate) will_retry: bool,
}

impl PublishFailed<'_> {
    pub(crate) fn emit(self) {
        if self.will_retry {
            tracing::info!(error = self.error, detail = %self.detail, attempt = self.attempt, "publish failed, retrying the same bytes");
        } else {
            tracing::warn!(error = self.error, detail = %self.detail, attempt = self.attempt, "publish failed");
        }
        counter!(PUBLISH_FAILURES_TOTAL, "error" => self.error).increment(1);
    }
}

/// A connection to a broker came up: the first one of a link, or a reconnect.
#[derive(Debug)]
pub(crate) struct BrokerConnected<'a> {
    pub(crate) broker: &'a str,
    pub(crate) role: &'static str,
    /// Connections this link made so far, this one included (1 for the first).
    pub(crate) generation: u64,
    /// Whether the link was up before (a reconnect, counted) or this is its first connection.
    pub(crate) reconnect: bool,
}

impl BrokerConnected<'_> {
    pub(crate) fn emit(self) {
        let (broker, role) = (self.broker.to_owned(), self.role);
        if !self.reconnect {
            tracing::info!(%broker, role, "connected to broker");
        } else {
            tracing::info!(%broker, role, generation = self.generation, "reconnected to broker");
            counter!(BROKER_RECONNECTS_TOTAL, "broker" => broker.clone(), "role" => role)
                .increment(1);
        }
        gauge!(BROKER_CONNECTED, "broker" => broker, "role" => role).set(1.0);
    }
}

/// A connection to a broker was lost (or closed at shutdown, with no `reason`).
#[derive(Debug)]
pub(crate) struct BrokerDisconnected<'a> {
    pub(crate) broker: &'a str,
    pub(crate) role: &'static str,
    /// Why it was lost; `None` when the transport is closing.
    pub(crate) reason: Option<&'a str>,
}

impl BrokerDisconnected<'_> {
    pub(crate) fn emit(self) {
        let broker = self.broker.to_owned();
        if let Some(reason) = self.reason {
            tracing::warn!(%broker, role = self.role, error = %reason, "broker connection lost; reconnecting");
        }
        gauge!(BROKER_CONNECTED, "broker" => broker.clone(), "role" => self.role).set(0.0);
        // A lost connection's alarm is not known to hold on the next one.
        gauge!(BROKER_BLOCKED, "broker" => broker).set(0.0);
    }
}

/// The broker blocked publishing (`reason` given) or unblocked it (`None`).
#[derive(Debug)]
pub(crate) struct BrokerBlocked<'a> {
    pub(crate) broker: &'a str,
    pub(crate) reason: Option<&'a str>,
}

impl BrokerBlocked<'_> {
    pub(crate) fn emit(self) {
        let broker = self.broker.to_owned();
        match self.reason {
            Some(reason) => tracing::warn!(%broker, %reason, "broker blocked publishing"),
            None => tracing::info!(%broker, "broker unblocked publishing"),
        }
        gauge!(BROKER_BLOCKED, "broker" => broker).set(if self.reason.is_some() {
            1.0
        } else {
            0.0
        });
    }
}

/// The broker closed a publishing channel; the transport opened another.
#[derive(Debug)]
pub(crate) struct ChannelReplaced<'a> {
    pub(crate) broker: &'a str,
    pub(crate) channel: u16,
}

impl ChannelReplaced<'_> {
    pub(crate) fn emit(self) {
        tracing::info!(
            broker = self.broker,
            channel = self.channel,
            "publishing channel closed by the broker; replaced"
        );
        counter!(BROKER_CHANNELS_REPLACED_TOTAL, "broker" => self.broker.to_owned()).increment(1);
    }
}

/// The broker refused a declaration with `PRECONDITION_FAILED`: the object exists with
/// other arguments and is kept as it is (its fallback declaration ran instead).
#[derive(Debug)]
pub(crate) struct DeclarationKept<'a> {
    pub(crate) broker: &'a str,
    pub(crate) key: &'a str,
    pub(crate) error: &'a lapin::Error,
}

impl DeclarationKept<'_> {
    pub(crate) fn emit(self) {
        tracing::warn!(
            broker = self.broker,
            declaration = self.key,
            error = %self.error,
            "an existing object has other arguments than this release declares; kept as it \
             is (its arguments cannot change: set them with a broker policy, docs/binding.md)"
        );
        counter!(BROKER_DECLARATIONS_KEPT_TOTAL, "declaration" => self.key.to_owned()).increment(1);
    }
}

/// A consumer subscribed again after a reconnect or a broker-side cancel.
#[derive(Debug)]
pub(crate) struct ConsumerResubscribed<'a> {
    pub(crate) queue: &'a str,
    pub(crate) broker: &'a str,
}

impl ConsumerResubscribed<'_> {
    pub(crate) fn emit(self) {
        tracing::info!(
            queue = self.queue,
            broker = self.broker,
            "consumer subscribed again"
        );
        counter!(CONSUMER_RESUBSCRIBED_TOTAL, "queue" => self.queue.to_owned()).increment(1);
    }
}
