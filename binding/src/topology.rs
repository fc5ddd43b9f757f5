//! Broker topology (`docs/binding.md` section 1): the names every service derives from a
//! namespace and a partition count, and their idempotent declaration on RabbitMQ.

#[cfg(feature = "transport")]
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
#[cfg(feature = "transport")]
use lapin::types::{AMQPValue, FieldTable, ShortString};
#[cfg(feature = "transport")]
use lapin::{Channel, ExchangeKind};

/// Queue type of partition and dead-letter queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated Raft queues: the highly available default.
    #[default]
    Quorum,
    /// Classic durable queues.
    Classic,
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            other => Err(format!(
                "unknown queue type {other:?}: expected quorum or classic"
            )),
        }
    }
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// The router's delay tiers, each a queue of its own ([`Topology::notify_delay_queue`]): a
/// delay goes to the shortest tier at least as long.
pub const NOTIFY_DELAY_TIERS: [std::time::Duration; 7] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(4),
    std::time::Duration::from_secs(16),
    std::time::Duration::from_secs(64),
    std::time::Duration::from_secs(256),
    std::time::Duration::from_secs(1024),
    std::time::Duration::from_secs(3600),
];

/// The names and shape of a Sluice deployment on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Prefix of every name (`sluice` by default); lets several deployments or test runs
    /// share one broker.
    pub namespace: String,
    /// Partitions per consumer group.
    pub partitions: u32,
    /// Type of the queues.
    pub queue_type: QueueType,
    /// Partition queues are single-active-consumer (`x-single-active-consumer`): of the
    /// consumers of a partition one at a time receives, the others stand by, so a
    /// partition is processed in order. Fixed at the queue's first declaration.
    pub single_active_consumer: bool,
    /// Bound of each dead-letter queue (`<ns>.dead-letter`, `<ns>.notify.dead`), bytes of
    /// message bodies; past it the broker drops the oldest dead letters (`drop-head`), so a
    /// tenant sending bad data cannot fill the broker's disk. 0: unbounded. Fixed at the
    /// queue's first declaration; a queue declared before with other arguments is kept (a
    /// warning says so) and is bounded with a policy instead (docs/binding.md section 4).
    pub dead_letter_max_bytes: u64,
}

/// Default [`Topology::dead_letter_max_bytes`]: 1 GiB, some 90 000 dead batches of 500
/// readings.
pub const DEFAULT_DEAD_LETTER_MAX_BYTES: u64 = 1 << 30;

impl Default for Topology {
    fn default() -> Self {
        Self {
            namespace: "sluice".to_owned(),
            partitions: 4,
            queue_type: QueueType::Quorum,
            single_active_consumer: false,
            dead_letter_max_bytes: DEFAULT_DEAD_LETTER_MAX_BYTES,
        }
    }
}

impl Topology {
    /// A topology with the default queue type.
    pub fn new(namespace: impl Into<String>, partitions: u32) -> Self {
        Self {
            namespace: namespace.into(),
            partitions,
            ..Self::default()
        }
    }

    /// The exchange producers publish batches to.
    pub fn telemetry_exchange(&self) -> String {
        format!("{}.telemetry", self.namespace)
    }

    /// The queue of partition `p` in consumer group `group`.
    pub fn partition_queue(&self, group: &str, p: u32) -> String {
        format!("{}.{group}.{p}", self.namespace)
    }

    /// The dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }

    /// The dead-letter queue.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }

    /// The fanout exchange of commit receipts.
    pub fn commits_exchange(&self) -> String {
        format!("{}.commits", self.namespace)
    }

    /// The topic exchange analytics services publish derived events to (section 7).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// The queue of derived events the routers share.
    pub fn router_events_queue(&self) -> String {
        format!("{}.router.events", self.namespace)
    }

    /// The router's exchange of notification jobs to deliver.
    pub fn notify_exchange(&self) -> String {
        format!("{}.notify", self.namespace)
    }

    /// The router's notify queue of partition `p`.
    pub fn notify_queue(&self, p: u32) -> String {
        format!("{}.notify.{p}", self.namespace)
    }

    /// The router's exchange of delayed notification jobs.
    pub fn notify_delay_exchange(&self) -> String {
        format!("{}.notify.delay", self.namespace)
    }

    /// The router's queue of one delay tier ([`NOTIFY_DELAY_TIERS`]).
    pub fn notify_delay_queue(&self, tier: std::time::Duration) -> String {
        format!("{}.notify.delay.{}", self.namespace, tier.as_millis())
    }

    /// The dead-letter queue of undeliverable notifications.
    pub fn notify_dead_queue(&self) -> String {
        format!("{}.notify.dead", self.namespace)
    }

    /// The exchange a tenant's direct publishers use when the tenant has a quota
    /// (section 6): its ingress queue's only way in.
    pub fn ingress_exchange(&self, tenant: &str) -> String {
        format!("{}.ingress.{tenant}", self.namespace)
    }

    /// The queue in front of the partitions for one tenant with a quota: ingest's gate
    /// drains it at the tenant's rate (`sluice_ingest::gate`).
    pub fn ingress_queue(&self, tenant: &str) -> String {
        format!("{}.ingress.{tenant}", self.namespace)
    }

    /// Declares `tenant`'s ingress exchange (fanout) and queue: at most `max_bytes` of
    /// message bodies ready, past which the broker refuses publishes (`reject-publish`:
    /// the publisher gets a nack, the backlog never grows). Idempotent with the same bound;
    /// a queue declared with another bound fails with `PRECONDITION_FAILED` (change it with
    /// a policy, docs/binding.md section 6).
    #[cfg(feature = "transport")]
    pub async fn declare_ingress(
        &self,
        channel: &Channel,
        tenant: &str,
        max_bytes: u64,
    ) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let name = self.ingress_exchange(tenant);
        channel
            .exchange_declare(
                name.clone().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        args.insert(
            ShortString::from("x-max-length-bytes"),
            AMQPValue::LongLongInt(i64::try_from(max_bytes).unwrap_or(i64::MAX)),
        );
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString("reject-publish".into()),
        );
        let queue = self.ingress_queue(tenant);
        channel
            .queue_declare(queue.clone().into(), QueueDeclareOptions::durable(), args)
            .await?;
        channel
            .queue_bind(
                queue.into(),
                name.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// The routing key of partition `p`.
    pub fn routing_key(p: u32) -> String {
        p.to_string()
    }

    /// Declares the exchanges and the partition queues of `groups` (the dead-letter queue:
    /// [`declare_dead_letters`](Self::declare_dead_letters)). Idempotent: every service
    /// calls it at start with the same arguments.
    #[cfg(feature = "transport")]
    pub async fn declare(&self, channel: &Channel, groups: &[&str]) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.telemetry_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.commits_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let queue_opts = QueueDeclareOptions::durable();
        for group in groups {
            for p in 0..self.partitions {
                let queue = self.partition_queue(group, p);
                channel
                    .queue_declare(queue.clone().into(), queue_opts, self.partition_args())
                    .await?;
                channel
                    .queue_bind(
                        queue.into(),
                        self.telemetry_exchange().into(),
                        Self::routing_key(p).into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Declares the dead-letter exchange and its queue, bound by
    /// [`dead_letter_max_bytes`](Self::dead_letter_max_bytes). With `existing`, the queue
    /// is only checked to exist (passive), whatever its arguments: the fallback when the
    /// bounded declaration was refused because an older release declared it otherwise.
    #[cfg(feature = "transport")]
    pub async fn declare_dead_letters(
        &self,
        channel: &Channel,
        existing: bool,
    ) -> Result<(), lapin::Error> {
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.declare_dead_letter_queue(channel, &self.dead_letter_queue(), existing)
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue().into(),
                self.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Declares a dead-letter queue (`name`): durable, of the deployment's queue type,
    /// bounded by [`dead_letter_max_bytes`](Self::dead_letter_max_bytes) with `drop-head`
    /// overflow; with `existing`, passive (see [`declare_dead_letters`](Self::declare_dead_letters)).
    #[cfg(feature = "transport")]
    pub async fn declare_dead_letter_queue(
        &self,
        channel: &Channel,
        name: &str,
        existing: bool,
    ) -> Result<(), lapin::Error> {
        let opts = QueueDeclareOptions {
            passive: existing,
            ..QueueDeclareOptions::durable()
        };
        channel
            .queue_declare(name.into(), opts, self.dead_letter_args())
            .await
            .map(drop)
    }

    #[cfg(feature = "transport")]
    fn dead_letter_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        if self.dead_letter_max_bytes > 0 {
            args.insert(
                ShortString::from("x-max-length-bytes"),
                AMQPValue::LongLongInt(
                    i64::try_from(self.dead_letter_max_bytes).unwrap_or(i64::MAX),
                ),
            );
            args.insert(
                ShortString::from("x-overflow"),
                AMQPValue::LongString("drop-head".into()),
            );
        }
        args
    }

    #[cfg(feature = "transport")]
    fn partition_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        if self.single_active_consumer {
            args.insert(
                ShortString::from("x-single-active-consumer"),
                AMQPValue::Boolean(true),
            );
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec() {
        let t = Topology::new("sluice", 4);
        assert_eq!(t.telemetry_exchange(), "sluice.telemetry");
        assert_eq!(t.partition_queue("storage", 3), "sluice.storage.3");
        assert_eq!(t.dead_letter_exchange(), "sluice.dead-letter");
        assert_eq!(t.dead_letter_queue(), "sluice.dead-letter");
        assert_eq!(t.ingress_exchange("acme"), "sluice.ingress.acme");
        assert_eq!(t.ingress_queue("acme"), "sluice.ingress.acme");
        assert_eq!(t.commits_exchange(), "sluice.commits");
        assert_eq!(Topology::routing_key(2), "2");
    }
}
