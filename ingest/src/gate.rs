//! The gate: the quota of direct publishers (`docs/binding.md` section 6).
//!
//! A tenant with a quota and broker users of its own (`amqp_users`) is *gated*: its users
//! publish to its ingress exchange, `{namespace}.ingress.{tenant}`, never to the
//! partitions, and the exchange's one queue holds at most
//! [`GateConfig::max_backlog_bytes`] of bodies, past which the broker refuses the tenant's
//! publishes with a nack (`x-overflow = reject-publish`): the direct publisher's 429. The
//! gate drains each queue at the tenant's rate, from the same buckets as its HTTP requests
//! ([`crate::quota`]), and forwards each batch as it is (same bytes, same id) to the
//! partitions as Sluice's own user; it acks a delivery only once the forward was confirmed,
//! so a batch the broker confirmed to its publisher is stored, and a redelivery after a
//! crash is a republish that storage deduplicates.
//!
//! A tenant over its quota fills its own queue only; the partitions, and every other
//! tenant, see at most its rate. A batch in the queue that is not the tenant's (another
//! tenant named, or a publisher that is not one of its users) or that cannot be decoded is
//! dead-lettered with the reason; one larger than a second of the quota too (`invalid`: it
//! could never pass). Refusals are paced by the quota like forwards, so the tenant's dead
//! letters grow no faster than its data would. With several ingest processes the queues have competing consumers and
//! each process spends its own buckets, so a tenant's rate is their sum, as over HTTP.

use std::future::Future;

use axum::body::Bytes;
use sluice_binding::TenantId;
use sluice_binding::codec;
use sluice_binding::dead_letter::{DeadLetterKind, Refusal};
use sluice_binding::tenancy::Publisher;
use sluice_binding::transport::{Consumer, DeadLetter, Delivery, Transport, TransportError};
use tokio::task::JoinSet;

use crate::http::AppState;
use crate::internal_events::{GateDeadLettered, GateForwardFailed, GateForwarded};

/// The consumer group name the gate's dead letters carry (`x-sluice-group`).
pub const GROUP: &str = "ingest-gate";

/// The fewest bytes one reading takes in a batch (MessagePack: device and metric index of
/// one byte each, timestamp and value of nine): what bytes that are no batch are charged
/// as, in readings.
const MIN_READING_BYTES: usize = 20;

/// The gate's settings.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// Bytes of bodies each gated tenant's ingress queue holds ready; past them the broker
    /// nacks the tenant's publishes. Fixed when the queue is first declared (a policy
    /// changes it later: docs/binding.md section 6).
    pub max_backlog_bytes: u64,
    /// Deliveries each ingress consumer holds unsettled: how many forwards are in flight
    /// per tenant and broker.
    pub prefetch: u16,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            max_backlog_bytes: 64 * 1024 * 1024,
            prefetch: 32,
        }
    }
}

/// Why the gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Declaring or consuming the ingress queues failed.
    #[error("cannot open the ingress queues of the gated tenants: {0}")]
    Transport(#[from] TransportError),
}

/// The gate, started: its consumers are subscribed. [`Gate::run`] forwards.
#[derive(Debug)]
pub struct Gate {
    state: AppState,
    consumers: Vec<(TenantId, Consumer)>,
}

impl Gate {
    /// Declares the ingress exchange and queue of every gated tenant and subscribes to
    /// them; fails (with the broker's reason) if they cannot be, so a misconfigured gate
    /// stops ingest at start. A gate with no tenant gated, or on the in-process transport
    /// (no direct publishers there), does nothing.
    pub async fn start(state: AppState, cfg: GateConfig) -> Result<Self, GateError> {
        let gated = state.tenants().gated();
        let amqp = match state.producer().transport() {
            Transport::Amqp(t) if !gated.is_empty() => t.clone(),
            _ => {
                return Ok(Self {
                    state,
                    consumers: Vec::new(),
                });
            }
        };
        let topology = amqp.topology().clone();
        let (names, max_bytes) = (gated.clone(), cfg.max_backlog_bytes);
        amqp.declare_with("ingest-gate", move |ch| {
            let (topology, names) = (topology.clone(), names.clone());
            Box::pin(async move {
                for t in &names {
                    topology.declare_ingress(&ch, t.as_str(), max_bytes).await?;
                }
                Ok(())
            })
        })
        .await?;
        let queues: Vec<String> = gated
            .iter()
            .map(|t| amqp.topology().ingress_queue(t.as_str()))
            .collect();
        let consumers = amqp
            .consume_queues(&queues, cfg.prefetch)
            .await?
            .into_iter()
            .filter_map(|c| {
                let tenant = gated
                    .iter()
                    .find(|t| **c.queue() == *amqp.topology().ingress_queue(t.as_str()))?;
                Some((tenant.clone(), c))
            })
            .collect();
        tracing::info!(tenants = ?gated, "gate: forwarding the ingress queues of gated tenants");
        Ok(Self { state, consumers })
    }

    /// Forwards until `shutdown` resolves; then stops consuming. Forwards still waiting
    /// for their tenant's rate are dropped unsettled: the broker redelivers them later.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut loops = JoinSet::new();
        for (tenant, consumer) in self.consumers {
            loops.spawn(drain(self.state.clone(), tenant, consumer, stop.clone()));
        }
        shutdown.await;
        stop.cancel();
        while loops.join_next().await.is_some() {}
    }
}

/// Forwards one consumer's deliveries, up to its prefetch at once, until `stop`.
async fn drain(
    state: AppState,
    tenant: TenantId,
    mut consumer: Consumer,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut inflight = JoinSet::new();
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        inflight.spawn(forward(state.clone(), tenant.clone(), delivery));
        // Reap what finished; the broker's prefetch bounds the rest.
        while inflight.try_join_next().is_some() {}
    }
    consumer.cancel().await;
    // Forwards waiting for their tenant's rate would wait long: their deliveries go back
    // to the queue when the channel closes (unsettled), and are forwarded later.
    inflight.abort_all();
    while inflight.join_next().await.is_some() {}
}

/// Checks, paces and forwards one delivery, then settles it.
async fn forward(state: AppState, tenant: TenantId, d: Delivery) {
    let Delivery {
        body,
        publisher,
        acker,
        ..
    } = d;
    let admitted = admit(&state, &tenant, &publisher, &body);
    // Everything in the queue costs the tenant's quota, refusals too, so that a flood of
    // garbage reaches the dead-letter queue no faster than batches reach the partitions.
    // Bytes that are no batch cost the most readings bytes of that size could hold.
    let readings = match &admitted {
        Ok(view) => view.len(),
        Err(_) => body.len().div_ceil(MIN_READING_BYTES).max(1),
    };
    let paced = state.quotas().wait(&tenant, readings, body.len()).await;
    let view = match admitted {
        Ok(view) => view,
        Err(refusal) => return dead_letter(&state, &tenant, body, refusal, acker).await,
    };
    if let Err(over) = paced {
        let refusal = Refusal::new(
            DeadLetterKind::Invalid,
            format!(
                "the batch is larger than a second of tenant {tenant}'s quota ({} {}): it could \
                 never pass; publish smaller batches",
                over.rate, over.which
            ),
        );
        return dead_letter(&state, &tenant, body, refusal, acker).await;
    }
    until_confirmed(&tenant, || state.producer().forward(&body, &view)).await;
    GateForwarded {
        tenant: tenant.as_str(),
        readings: view.len(),
    }
    .emit();
    // A lost ack: redelivered and forwarded again, and storage keeps it once.
    let _ = acker.ack().await;
}

/// Runs a publish until the broker confirms it, backing off from 100 ms to 5 s while it
/// refuses (an alarm, a reconnect; the producer's own retries are spent). Not a requeue:
/// that would count broker redeliveries, which RabbitMQ 4's quorum queues turn into drops
/// past their delivery limit. The gate's shutdown aborts the wait; the delivery, still
/// unsettled, goes back to the queue.
async fn until_confirmed<F, Fut, E>(tenant: &TenantId, mut publish: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut wait = RETRY_FIRST;
    while let Err(e) = publish().await {
        GateForwardFailed {
            tenant: tenant.as_str(),
            error: &e,
        }
        .emit();
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The batch, if it is `tenant`'s and published by one of its users (or Sluice's own).
fn admit<'a>(
    state: &AppState,
    tenant: &TenantId,
    publisher: &Publisher,
    body: &'a [u8],
) -> Result<sluice_binding::BatchView<'a>, Refusal> {
    let view = codec::decode(body)?;
    if !matches!(publisher, Publisher::Sluice)
        && !state.tenants().is_amqp_user_of(publisher, tenant)
    {
        let who = match publisher {
            Publisher::User(u) => format!("broker user {u:?}"),
            _ => "a publisher without user_id".to_owned(),
        };
        return Err(Refusal::new(
            DeadLetterKind::Forbidden,
            format!("{who} is not one of tenant {tenant}'s amqp_users"),
        ));
    }
    if view.tenant != tenant.as_str() {
        return Err(Refusal::new(
            DeadLetterKind::Forbidden,
            format!(
                "a batch for tenant {:?} in tenant {tenant}'s ingress queue",
                view.tenant
            ),
        ));
    }
    Ok(view)
}

async fn dead_letter(
    state: &AppState,
    tenant: &TenantId,
    body: Bytes,
    refusal: Refusal,
    acker: sluice_binding::transport::Acker,
) {
    let dl = DeadLetter {
        body: &body,
        refusal: &refusal,
        group: GROUP,
    };
    until_confirmed(tenant, || state.producer().transport().dead_letter(dl)).await;
    GateDeadLettered {
        tenant: tenant.as_str(),
        error: refusal.kind.as_str(),
        reason: &refusal.reason,
    }
    .emit();
    let _ = acker.ack().await;
}
