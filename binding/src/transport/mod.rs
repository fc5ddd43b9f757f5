//! Transports: how batches travel between Sluice services.
//!
//! Two implementations of one contract:
//! - [`amqp`]: RabbitMQ over AMQP 0-9-1 (lapin) — publisher confirms on every publish,
//!   manual acks, supervised connections that replace themselves; the production transport;
//! - [`inproc`]: bounded in-process queues — the embedded default, one process, no broker.
//!
//! The contract: [`Transport::publish`] returns only once the message is safely queued
//! (broker confirm, or enqueued in-process); a [`Delivery`] stays unsettled until the
//! consumer acks it after its effect is durable, and an unsettled delivery comes back
//! (redelivered) if its consumer goes away. Each consumer holds at most `prefetch`
//! unsettled deliveries: that window is the back pressure between broker and workers.
//!
//! The two are an enum rather than trait objects: the set is closed and enum dispatch
//! keeps the hot path free of boxing.

pub mod amqp;
pub mod inproc;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::dead_letter::Refusal;
use crate::receipt::Receipt;
use crate::tenancy::Publisher;
use crate::topology::Topology;

/// A batch to publish.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    /// Target partition.
    pub partition: u32,
    /// Encoded batch.
    pub body: &'a [u8],
    /// Batch id (AMQP `message_id`).
    pub batch_id: Uuid,
    /// Producer id (AMQP `app_id`).
    pub producer: &'a str,
}

/// A message being dead-lettered by a consumer.
#[derive(Clone, Copy, Debug)]
pub struct DeadLetter<'a> {
    /// The original body, unchanged.
    pub body: &'a [u8],
    /// Why: its kind (`x-sluice-error`) and reason (`x-sluice-reason`).
    pub refusal: &'a Refusal,
    /// The consumer group that refused it (`x-sluice-group`).
    pub group: &'a str,
}

/// Why a publish was not confirmed. Callers answer their own senders with 503/Retry-After
/// on any of these: the batch is not known to be stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker blocked publishing (memory or disk alarm).
    #[error("{0}")]
    Blocked(String),
    /// No broker connection is up (the transport is reconnecting); said at once rather
    /// than waited out.
    #[error("{0}")]
    Unavailable(String),
    /// The broker refused the message.
    #[error("broker nacked the message")]
    Nacked,
    /// No queue is bound for the partition (topology not declared, or wrong partition count).
    #[error("message was unroutable: no queue bound to partition {0}")]
    Unroutable(u32),
    /// No confirm arrived in time.
    #[error("no publisher confirm within {0:?}")]
    Timeout(std::time::Duration),
    /// The channel or the connection failed under the publish (a channel the broker
    /// closed, e.g. for an exchange that does not exist, or a lost connection).
    #[error("broker channel or connection failed: {0}")]
    Connection(#[from] lapin::Error),
    /// The transport was closed.
    #[error("transport closed")]
    Closed,
}

impl PublishError {
    /// A stable name for metrics and logs: `blocked`, `unavailable`, `nacked`,
    /// `unroutable`, `timeout`, `connection`, `closed`.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Blocked(_) => "blocked",
            PublishError::Unavailable(_) => "unavailable",
            PublishError::Nacked => "nacked",
            PublishError::Unroutable(_) => "unroutable",
            PublishError::Timeout(_) => "timeout",
            PublishError::Connection(_) => "connection",
            PublishError::Closed => "closed",
        }
    }
}

/// Setting up a transport or a consumer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not connect to a broker within the connect timeout.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// Broker URL, credentials removed.
        url: String,
        /// The last attempt's failure.
        reason: String,
    },
    /// A broker URL that does not parse.
    #[error("invalid broker URL {url}: {reason}")]
    InvalidUrl {
        /// Broker URL, credentials removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection to a broker is up now.
    #[error("{0}")]
    Unavailable(String),
    /// The transport was closed.
    #[error("transport closed")]
    Closed,
    /// A broker operation failed.
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    /// An in-process queue already has its consumer.
    #[error("in-process queue {0} already has a consumer")]
    AlreadyConsumed(String),
    /// The consumer group was not declared.
    #[error("consumer group {0:?} was not declared")]
    UnknownGroup(String),
}

/// A transport, cheap to clone (shared handles inside).
#[derive(Clone, Debug)]
pub enum Transport {
    /// RabbitMQ.
    Amqp(amqp::AmqpTransport),
    /// In-process queues.
    InProcess(inproc::InProcessTransport),
}

impl Transport {
    /// The topology this transport serves.
    pub fn topology(&self) -> &Topology {
        match self {
            Transport::Amqp(t) => t.topology(),
            Transport::InProcess(t) => t.topology(),
        }
    }

    /// Declares the topology with the partition queues of `groups` (idempotent).
    pub async fn declare(&self, groups: &[&str]) -> Result<(), TransportError> {
        match self {
            Transport::Amqp(t) => t.declare(groups).await,
            Transport::InProcess(t) => {
                t.declare(groups);
                Ok(())
            }
        }
    }

    /// Publishes a batch and waits for its confirm.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), PublishError> {
        match self {
            Transport::Amqp(t) => t.publish(msg).await,
            Transport::InProcess(t) => t.publish(msg).await,
        }
    }

    /// Publishes a refused message to the dead-letter exchange and waits for its confirm.
    pub async fn dead_letter(&self, dl: DeadLetter<'_>) -> Result<(), PublishError> {
        match self {
            Transport::Amqp(t) => t.dead_letter(dl).await,
            Transport::InProcess(t) => {
                t.dead_letter(dl);
                Ok(())
            }
        }
    }

    /// Publishes a commit receipt (transient; receivers that are absent miss it).
    pub async fn publish_receipt(&self, receipt: &Receipt) -> Result<(), PublishError> {
        match self {
            Transport::Amqp(t) => t.publish_receipt(receipt).await,
            Transport::InProcess(t) => {
                t.publish_receipt(receipt);
                Ok(())
            }
        }
    }

    /// Receipts published from now on, through a bounded channel (`capacity`); when the
    /// reader falls behind, the forwarding task waits (AMQP: the broker buffers; in-process:
    /// the broadcast ring drops the oldest and logs how many were missed).
    pub async fn subscribe_receipts(
        &self,
        capacity: usize,
    ) -> Result<mpsc::Receiver<Receipt>, TransportError> {
        match self {
            Transport::Amqp(t) => t.subscribe_receipts(capacity).await,
            Transport::InProcess(t) => Ok(t.subscribe_receipts(capacity)),
        }
    }

    /// One consumer per partition queue of `group` (per broker, with several brokers).
    pub async fn consume_group(
        &self,
        group: &str,
        prefetch: u16,
    ) -> Result<Vec<Consumer>, TransportError> {
        match self {
            Transport::Amqp(t) => t.consume_group(group, prefetch).await,
            Transport::InProcess(t) => t.consume_group(group, prefetch),
        }
    }

    /// Messages ready in each partition queue of `group`, as `(queue, depth)`.
    pub async fn backlog(&self, group: &str) -> Result<Vec<(String, u64)>, TransportError> {
        match self {
            Transport::Amqp(t) => t.backlog(group).await,
            Transport::InProcess(t) => t.backlog(group),
        }
    }

    /// Why publishing is refused right now, if it is: every broker blocked (memory or disk
    /// alarm) or not connected.
    pub fn blocked(&self) -> Option<String> {
        match self {
            Transport::Amqp(t) => t.blocked(),
            Transport::InProcess(_) => None,
        }
    }

    /// Whether the transport can do its work now (for `/readyz`): a broker connection up
    /// for each role and every consumer subscribed; with several brokers, one that is down
    /// while another does its work only degrades it. The in-process transport is always
    /// ready.
    pub fn readiness(&self) -> Readiness {
        match self {
            Transport::Amqp(t) => t.readiness(),
            Transport::InProcess(_) => Readiness::default(),
        }
    }

    /// Closes connections (AMQP) after in-flight work settled.
    pub async fn close(&self) {
        if let Transport::Amqp(t) = self {
            t.close().await;
        }
    }
}

/// What [`Transport::readiness`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    /// What keeps the transport from its work; empty when ready.
    pub problems: Vec<String>,
    /// What is wrong without stopping the work: of several brokers, those down or blocked
    /// while another takes over, and the consumers waiting for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
    /// Consumers opened.
    pub consumers: usize,
    /// Of them, subscribed now (the others are waiting for a connection or the queue).
    pub consumers_attached: usize,
}

impl Readiness {
    /// No problem found.
    pub fn is_ready(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A stream of deliveries from one partition queue.
#[derive(Debug)]
pub struct Consumer {
    queue: Arc<str>,
    inner: ConsumerInner,
}

#[derive(Debug)]
enum ConsumerInner {
    // Boxed: lapin's consumer is far larger than the in-process one.
    Amqp(Box<amqp::AmqpConsumer>),
    InProcess(inproc::InProcessConsumer),
}

impl Consumer {
    /// The queue consumed.
    pub fn queue(&self) -> &Arc<str> {
        &self.queue
    }

    /// The next delivery; `None` once the consumer was cancelled or its transport closed.
    /// Waits while `prefetch` deliveries are unsettled.
    pub async fn next(&mut self) -> Option<Delivery> {
        let queue = self.queue.clone();
        match &mut self.inner {
            ConsumerInner::Amqp(c) => c.next(queue).await,
            ConsumerInner::InProcess(c) => c.next(queue).await,
        }
    }

    /// Stops receiving: the broker stops sending to this consumer. Unsettled deliveries
    /// stay valid and can still be acked.
    pub async fn cancel(&mut self) {
        match &mut self.inner {
            ConsumerInner::Amqp(c) => c.cancel().await,
            ConsumerInner::InProcess(c) => c.cancel(),
        }
    }
}

/// One message received, to be settled exactly once with [`Acker::ack`] or
/// [`Acker::requeue`]; dropped unsettled, it is redelivered later.
#[derive(Debug)]
pub struct Delivery {
    /// The message body.
    pub body: Bytes,
    /// Whether it may have been delivered before (deduplication must check it).
    pub redelivered: bool,
    /// The queue it came from.
    pub queue: Arc<str>,
    /// Who published it, as far as the broker vouches (`docs/binding.md` section 6).
    pub publisher: Publisher,
    /// Settles the delivery.
    pub acker: Acker,
}

/// Settles one delivery.
#[derive(Debug)]
pub enum Acker {
    /// AMQP delivery.
    Amqp(lapin::Acker),
    /// In-process delivery.
    InProcess(inproc::InProcessAcker),
}

impl Acker {
    /// Done: the effect is durable.
    pub async fn ack(self) -> Result<(), lapin::Error> {
        match self {
            Acker::Amqp(a) => a
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map(|_| ()),
            Acker::InProcess(a) => {
                a.ack();
                Ok(())
            }
        }
    }

    /// Put it back to be delivered again (a transient failure downstream).
    pub async fn requeue(self) -> Result<(), lapin::Error> {
        match self {
            Acker::Amqp(a) => a
                .nack(lapin::options::BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map(|_| ()),
            Acker::InProcess(a) => {
                a.requeue();
                Ok(())
            }
        }
    }
}
