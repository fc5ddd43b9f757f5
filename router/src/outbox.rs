//! The router's own objects on the broker, and publishing to them: the durable path every
//! notification takes between matching and delivery.
//!
//! ```text
//! {ns}.events (topic) ──#──► {ns}.router.events            derived events to match
//! {ns}.notify (topic) ─*.p─► {ns}.notify.p  (p < partitions) jobs to deliver
//! {ns}.notify.delay (topic) ─{ms}.*─► {ns}.notify.delay.{ms}  TTL, then dead-lettered
//!                                   back to {ns}.notify with their key `{ms}.p`
//! {ns}.notify.dead                                            undeliverable, with a reason
//! ```
//!
//! A job is published with routing key `now.p` (p from its subscription id, so one
//! subscription's jobs meet in one queue and batches fill). A retry or a rate-limited
//! notification is published to the delay exchange with key `{tier}.p` and a per-message
//! expiration; the tier queue's TTL bounds the wait, and when the message expires RabbitMQ
//! dead-letters it to `{ns}.notify` with its key unchanged, where `*.p` takes it back to
//! partition `p`. Per-message TTLs expire only at the head of a queue, so delays are
//! grouped into tiers (×4 apart) and a message waits at most its tier's length.
//!
//! Quorum queues dead-letter at-least-once (`x-dead-letter-strategy`), which needs
//! `x-overflow: reject-publish`.

use std::time::Duration;

use futures::future::BoxFuture;
use lapin::BasicProperties;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use sluice_binding::transport::amqp::AmqpTransport;
use sluice_binding::transport::{Consumer, PublishError, TransportError};
use sluice_binding::{QueueType, Topology};
use uuid::Uuid;

use crate::job::Job;

/// Content type of jobs and derived events.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// The delay tiers (named in the binding's topology, like every queue).
pub use sluice_binding::topology::NOTIFY_DELAY_TIERS as DELAY_TIERS;

/// The outbox: names, declaration, publishing. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    transport: AmqpTransport,
    topology: Topology,
    partitions: u32,
    queue_type: QueueType,
}

impl Outbox {
    /// The outbox of `transport`'s namespace, with `partitions` notify queues.
    pub fn new(transport: AmqpTransport, partitions: u32) -> Self {
        let topology = transport.topology().clone();
        let queue_type = topology.queue_type;
        Self {
            transport,
            topology,
            partitions: partitions.max(1),
            queue_type,
        }
    }

    /// The transport.
    pub fn transport(&self) -> &AmqpTransport {
        &self.transport
    }

    /// The events exchange, where analytics services publish derived events.
    pub fn events_exchange(&self) -> String {
        self.topology.events_exchange()
    }

    /// The queue of derived events the routers share.
    pub fn events_queue(&self) -> String {
        self.topology.router_events_queue()
    }

    /// The exchange of jobs to deliver.
    pub fn notify_exchange(&self) -> String {
        self.topology.notify_exchange()
    }

    /// The notify queue of partition `p`.
    pub fn notify_queue(&self, p: u32) -> String {
        self.topology.notify_queue(p)
    }

    /// Every notify queue.
    pub fn notify_queues(&self) -> Vec<String> {
        (0..self.partitions).map(|p| self.notify_queue(p)).collect()
    }

    /// The exchange of delayed jobs.
    pub fn delay_exchange(&self) -> String {
        self.topology.notify_delay_exchange()
    }

    /// The queue of one delay tier.
    pub fn delay_queue(&self, tier: Duration) -> String {
        self.topology.notify_delay_queue(tier)
    }

    /// The dead-letter queue of undeliverable notifications.
    pub fn dead_queue(&self) -> String {
        self.topology.notify_dead_queue()
    }

    /// The notify partition of a subscription.
    pub fn partition_of(&self, subscription: Uuid) -> u32 {
        partition_of(subscription, self.partitions)
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        args
    }

    /// Declares every object of the outbox on every broker (idempotent), now and again
    /// on every new connection to a broker.
    pub async fn declare(&self) -> Result<(), TransportError> {
        let this = self.clone();
        self.transport
            .declare_with("router-outbox", move |ch| {
                let this = this.clone();
                Box::pin(async move { this.declare_on(&ch).await })
            })
            .await?;
        // The dead queue is bounded (drop-head); one declared unbounded by an older
        // release is kept as it is, with a warning.
        let declare = |existing: bool| {
            let this = self.clone();
            move |ch: lapin::Channel| {
                let this = this.clone();
                Box::pin(async move {
                    this.topology
                        .declare_dead_letter_queue(&ch, &this.dead_queue(), existing)
                        .await
                }) as BoxFuture<'static, _>
            }
        };
        self.transport
            .declare_with_fallback("router-outbox-dead", declare(false), declare(true))
            .await
    }

    async fn declare_on(&self, ch: &lapin::Channel) -> Result<(), lapin::Error> {
        let topic = ExchangeKind::Topic;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let bind = |q: String, x: String, key: String| {
            ch.queue_bind(
                q.into(),
                x.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
        };
        for x in [
            self.events_exchange(),
            self.notify_exchange(),
            self.delay_exchange(),
        ] {
            ch.exchange_declare(x.into(), topic.clone(), durable, FieldTable::default())
                .await?;
        }
        let q = QueueDeclareOptions::durable();
        ch.queue_declare(self.events_queue().into(), q, self.queue_args())
            .await?;
        bind(self.events_queue(), self.events_exchange(), "#".into()).await?;
        for p in 0..self.partitions {
            ch.queue_declare(self.notify_queue(p).into(), q, self.queue_args())
                .await?;
            bind(
                self.notify_queue(p),
                self.notify_exchange(),
                format!("*.{p}"),
            )
            .await?;
        }
        for tier in DELAY_TIERS {
            let mut args = self.queue_args();
            args.insert(
                ShortString::from("x-message-ttl"),
                AMQPValue::LongLongInt(tier.as_millis() as i64),
            );
            args.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString(self.notify_exchange().into()),
            );
            if self.queue_type == QueueType::Quorum {
                args.insert(
                    ShortString::from("x-dead-letter-strategy"),
                    AMQPValue::LongString("at-least-once".into()),
                );
                args.insert(
                    ShortString::from("x-overflow"),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            let queue = self.delay_queue(tier);
            ch.queue_declare(queue.clone().into(), q, args).await?;
            bind(
                queue,
                self.delay_exchange(),
                format!("{}.*", tier.as_millis()),
            )
            .await?;
        }
        Ok(())
    }

    fn props(key: &str) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(key.into())
    }

    /// Publishes a job for delivery now; returns once the broker confirmed it.
    pub async fn enqueue(&self, job: &Job, key: &str) -> Result<(), PublishError> {
        let p = self.partition_of(job.subscription);
        self.transport
            .publish_to(
                &self.notify_exchange(),
                &format!("now.{p}"),
                &job.encode(),
                Self::props(key),
                true,
            )
            .await
    }

    /// Publishes a job to come back after `after` (rounded up to whole milliseconds, at
    /// most the longest tier).
    pub async fn delay(&self, job: &Job, key: &str, after: Duration) -> Result<(), PublishError> {
        let p = self.partition_of(job.subscription);
        let (tier, ms) = delay_tier(after);
        let props = Self::props(key).with_expiration(ms.to_string().into());
        self.transport
            .publish_to(
                &self.delay_exchange(),
                &format!("{}.{p}", tier.as_millis()),
                &job.encode(),
                props,
                true,
            )
            .await
    }

    /// Publishes an undeliverable job to the dead-letter queue with the reason.
    pub async fn dead_letter(
        &self,
        job: &Job,
        key: &str,
        error: &str,
        reason: &str,
        attempts: u32,
    ) -> Result<(), PublishError> {
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("x-sluice-reason", reason.to_owned()),
            ("x-sluice-error", error.to_owned()),
            ("x-sluice-tenant", job.tenant.clone()),
            ("x-sluice-subscription", job.subscription.to_string()),
        ] {
            headers.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
        }
        headers.insert(
            ShortString::from("x-sluice-attempts"),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        let props = Self::props(key).with_headers(headers);
        self.transport
            .publish_to("", &self.dead_queue(), &job.encode(), props, true)
            .await
    }

    /// Consumers of every notify queue.
    pub async fn consume_notify(&self, prefetch: u16) -> Result<Vec<Consumer>, TransportError> {
        self.transport
            .consume_queues(&self.notify_queues(), prefetch)
            .await
    }

    /// A consumer of the derived-events queue.
    pub async fn consume_events(&self, prefetch: u16) -> Result<Vec<Consumer>, TransportError> {
        self.transport
            .consume_queues(&[self.events_queue()], prefetch)
            .await
    }
}

/// The notify partition of `subscription` among `partitions`.
fn partition_of(subscription: Uuid, partitions: u32) -> u32 {
    // UUID v7 ends in random bits: a fair spread.
    (subscription.as_u128() % u128::from(partitions.max(1))) as u32
}

/// The tier a delay of `after` waits in (the shortest at least as long, else the longest),
/// and the per-message expiration in whole milliseconds (at least 1, at most the tier).
fn delay_tier(after: Duration) -> (Duration, u128) {
    let tier = DELAY_TIERS
        .iter()
        .copied()
        .find(|t| *t >= after)
        .unwrap_or(DELAY_TIERS[DELAY_TIERS.len() - 1]);
    (tier, after.min(tier).as_millis().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_waits_in_the_shortest_tier_that_holds_it() {
        let s = Duration::from_secs;
        let cases = [
            (Duration::ZERO, (s(1), 1)),
            (Duration::from_micros(10), (s(1), 1)),
            (Duration::from_millis(500), (s(1), 500)),
            (s(1), (s(1), 1000)),
            (Duration::from_millis(1001), (s(4), 1001)),
            (s(60), (s(64), 60_000)),
            (s(1025), (s(3600), 1_025_000)),
            // Longer than every tier: the longest, capped.
            (s(7200), (s(3600), 3_600_000)),
        ];
        for (after, want) in cases {
            assert_eq!(delay_tier(after), want, "{after:?}");
        }
        assert!(DELAY_TIERS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn one_subscription_always_takes_one_partition_and_all_are_used() {
        let ids: Vec<Uuid> = (0..400).map(|_| Uuid::now_v7()).collect();
        let mut seen = [0u32; 4];
        for id in &ids {
            let p = partition_of(*id, 4);
            assert_eq!(p, partition_of(*id, 4));
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(partition_of(ids[0], 0), 0, "no partitions counts as one");
    }
}
