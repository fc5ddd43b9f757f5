//! The match stage: consumes the telemetry partitions (consumer group `router`) and the
//! derived-events queue, matches every event against the index, and publishes one job per
//! matched subscription to the outbox. A delivery is acked only after every job it produced
//! was confirmed by the broker: from then on the notifications are on a durable path. A
//! delivery whose jobs could not all be published is held and those jobs published again
//! with backoff (requeued only at shutdown; a redelivery re-publishes the same events with
//! the same ids, so subscribers can drop repeats).
//!
//! One task per consumer, each with its own `JobMatcher` (the matching
//! half, in `jobs.rs`): with device-hash partitioning a series always reaches the same
//! matcher, which keeps `changed_by` exact.

use std::future::Future;
use std::time::{Duration, Instant};

mod jobs;

use futures::future::join_all;
use std::sync::Arc;

use sluice_binding::Refusal;
use sluice_binding::tenancy::Tenants;
use sluice_binding::transport::{Consumer, DeadLetter, Delivery, Transport};
use sluice_binding::validate::Limits;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use sluice_binding::event::idempotency_key;

use crate::internal_events::{
    DeliveryMatched, DeliveryRefused, DeliveryRequeued, JobsPublishFailed,
};
use crate::job::Job;
use crate::outbox::Outbox;
use crate::sync::SharedIndex;
use jobs::JobMatcher;

/// The consumer group of the router on the telemetry partitions.
pub const GROUP: &str = "router";

/// Settings of the match stage.
#[derive(Clone, Debug)]
pub struct MatchConfig {
    /// Unsettled deliveries per consumer (telemetry batches in flight).
    pub prefetch: u16,
    /// Series whose previous value is remembered for `changed_by`, per consumer.
    pub max_series: usize,
    /// Most events in one job; more make several jobs.
    pub max_events_per_job: usize,
    /// Wait before the jobs of a delivery that the broker did not confirm are published
    /// again (doubling up to 30 s; the delivery stays unacked meanwhile), and before a
    /// delivery that cannot be dead-lettered is requeued.
    pub requeue_delay: Duration,
    /// The binding's validation bounds; the same as the storage pool's, so that a batch
    /// storage keeps is never dead-lettered here (`--max-future-skew` sets both).
    pub limits: Limits,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            prefetch: 32,
            max_series: 1_000_000,
            max_events_per_job: 1000,
            requeue_delay: Duration::from_secs(1),
            limits: Limits::default(),
        }
    }
}

/// Runs the match stage until `shutdown`; returns when every consumer task ended.
pub async fn run(
    transport: Transport,
    outbox: Outbox,
    index: SharedIndex,
    tenants: Arc<Tenants>,
    cfg: MatchConfig,
    shutdown: CancellationToken,
) -> Result<(), sluice_binding::transport::TransportError> {
    let mut consumers = transport.consume_group(GROUP, cfg.prefetch).await?;
    let events = outbox.consume_events(cfg.prefetch).await?;
    let n_telemetry = consumers.len();
    consumers.extend(events);
    let mut tasks = JoinSet::new();
    for (i, consumer) in consumers.into_iter().enumerate() {
        let source = if i < n_telemetry {
            Source::Telemetry
        } else {
            Source::Events
        };
        let worker = Worker {
            transport: transport.clone(),
            outbox: outbox.clone(),
            jobs: JobMatcher::new(
                index.clone(),
                tenants.clone(),
                cfg.limits,
                cfg.max_series,
                cfg.max_events_per_job,
            ),
            cfg: cfg.clone(),
            source,
        };
        tasks.spawn(worker.run(consumer, shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Source {
    Telemetry,
    Events,
}

struct Worker {
    transport: Transport,
    outbox: Outbox,
    jobs: JobMatcher,
    cfg: MatchConfig,
    source: Source,
}

impl Worker {
    /// Matching is sequential: the matcher remembers each series' last value, and batch
    /// order keeps `changed_by` exact. Publishing a delivery's jobs and waiting for the
    /// broker's confirms is not: every delivery the prefetch lets in awaits its confirms at
    /// once, so a partition moves at the broker's rate rather than one confirm round trip
    /// per batch. Acks may come out of order, which AMQP allows; the prefetch bounds the
    /// deliveries in flight.
    async fn run(mut self, mut consumer: Consumer, shutdown: CancellationToken) {
        let mut settling = JoinSet::new();
        loop {
            let delivery = tokio::select! {
                () = shutdown.cancelled() => break,
                Some(_) = settling.join_next(), if !settling.is_empty() => continue,
                d = consumer.next() => d,
            };
            let Some(delivery) = delivery else { break };
            settling.spawn(self.handle(delivery, shutdown.clone()));
        }
        // Whatever was matched is settled (acked or requeued) before the consumer goes.
        while settling.join_next().await.is_some() {}
        consumer.cancel().await;
    }

    /// Matches one delivery now; the returned future publishes its jobs and settles it.
    fn handle(
        &mut self,
        d: Delivery,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let started = Instant::now();
        let jobs = match self.source {
            Source::Telemetry => self.jobs.telemetry(&d.body, &d.publisher),
            Source::Events => self.jobs.derived(&d.body, &d.publisher),
        };
        let (outbox, transport) = (self.outbox.clone(), self.transport.clone());
        let requeue_delay = self.cfg.requeue_delay;
        async move {
            match jobs {
                Ok(jobs) => publish(&outbox, d, jobs, started, requeue_delay, &shutdown).await,
                Err(refusal) => refuse(&transport, d, &refusal, requeue_delay).await,
            }
        }
    }
}

/// Publishes a delivery's jobs to the outbox, then acks it. Jobs the broker did not
/// confirm are published again after a backoff (from `retry_delay`, doubling up to 30 s)
/// while the delivery stays unacked: a requeue would come back at once and count a
/// redelivery each time, which RabbitMQ 4's quorum queues turn into a dead letter past
/// their delivery limit. Only at shutdown is an unfinished delivery requeued.
async fn publish(
    outbox: &Outbox,
    d: Delivery,
    mut jobs: Vec<Job>,
    started: Instant,
    retry_delay: Duration,
    shutdown: &CancellationToken,
) {
    let (n_jobs, events) = (
        jobs.len(),
        jobs.iter().map(|j| j.events.len()).sum::<usize>(),
    );
    let mut wait = retry_delay;
    loop {
        let results = join_all(jobs.iter().map(|job| {
            let key = idempotency_key(job.subscription, &job.events);
            async move { outbox.enqueue(job, &key).await }
        }))
        .await;
        let mut failed = None;
        let mut results = results.into_iter();
        jobs.retain(|_| match results.next() {
            Some(Err(e)) => {
                failed.get_or_insert(e);
                true
            }
            _ => false,
        });
        let Some(e) = failed else { break };
        JobsPublishFailed {
            error: &e,
            queue: &d.queue,
            jobs: jobs.len(),
            retry_in: wait,
        }
        .emit();
        tokio::select! {
            () = shutdown.cancelled() => {
                DeliveryRequeued.emit();
                let _ = d.acker.requeue().await;
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(MAX_RETRY_DELAY);
    }
    DeliveryMatched {
        jobs: n_jobs,
        events,
        elapsed: started.elapsed(),
    }
    .emit();
    if let Err(e) = d.acker.ack().await {
        tracing::warn!(error = %e, "ack failed; the delivery will come again");
    }
}

/// Longest wait between two publishes of a delivery's unconfirmed jobs.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Moves an unusable delivery to the dead-letter queue with the reason.
async fn refuse(transport: &Transport, d: Delivery, refusal: &Refusal, requeue_delay: Duration) {
    DeliveryRefused {
        queue: &d.queue,
        error: refusal.kind.as_str(),
        reason: &refusal.reason,
    }
    .emit();
    let dl = DeadLetter {
        body: &d.body,
        refusal,
        group: GROUP,
    };
    match transport.dead_letter(dl).await {
        Ok(()) => {
            let _ = d.acker.ack().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot dead-letter; requeueing");
            tokio::time::sleep(requeue_delay).await;
            let _ = d.acker.requeue().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_binding::Topology;
    use sluice_binding::dead_letter::DeadLetterKind;
    use sluice_binding::transport::Outgoing;
    use sluice_binding::transport::inproc::InProcessTransport;
    use uuid::Uuid;

    use super::*;

    #[tokio::test]
    async fn a_refused_delivery_is_dead_lettered_with_its_reason_then_acked() {
        let inproc = InProcessTransport::new(Topology::new("t", 1), 8);
        let transport = Transport::InProcess(inproc.clone());
        transport.declare(&[GROUP]).await.unwrap();
        let msg = Outgoing {
            partition: 0,
            body: b"not a batch",
            batch_id: Uuid::now_v7(),
            producer: "test",
        };
        transport.publish(msg).await.unwrap();
        let mut consumer = transport.consume_group(GROUP, 8).await.unwrap().remove(0);
        let d = consumer.next().await.unwrap();
        let refusal = Refusal::new(DeadLetterKind::Decode, "not MessagePack");
        refuse(&transport, d, &refusal, Duration::from_millis(1)).await;
        let dead = inproc.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(&dead[0].body[..], b"not a batch");
        assert_eq!(
            (
                dead[0].kind,
                dead[0].reason.as_str(),
                dead[0].group.as_str()
            ),
            (DeadLetterKind::Decode, "not MessagePack", GROUP)
        );
        // Acked: it does not come back.
        let again = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
        assert!(again.is_err(), "the refused delivery came back");
    }
}
