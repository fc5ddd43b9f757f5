//! The delivery stage: consumes the outbox's notify queues, applies the notification
//! policies, and hands notifications to the notifiers.
//!
//! - **Nothing waits unacked.** A job's delivery is acked once every notification
//!   carrying its events is settled: delivered, moved to the delay queue (retry, rate
//!   limit, a Redis failure) or the dead-letter queue with a broker confirm, held in a
//!   `batch_notify` batch in Redis, or dropped by policy (superseded under
//!   `latest_notify`, past the expiration counter, subscription gone). What waits — a
//!   batch for its count or duration, a notification for its rate-limit window — waits in
//!   Redis or on the delay queue, never in the notify queues' prefetch windows, which every
//!   tenant shares: the prefetch bounds only the notifications being decided and sent.
//!   A killed router loses nothing: its unacked jobs are delivered again.
//! - **One policy loop, many sends.** The loop hands each job to a task of its own, at
//!   most `max_in_flight` at once, so a slow webhook delays only its own notifications.
//! - **Shared state.** Rate-limit windows, expiration counters, held batches and the
//!   newest `latest_notify` keys are in Redis ([`crate::store`]), so several router
//!   instances enforce one policy, and a batch outlives the instance that held it.
//! - **Retries are durable.** A failed delivery goes to the delay queue with its attempt
//!   count and comes back after a backoff with jitter; after `max_attempts` (or at once, for
//!   a permanent failure such as a 404 or a refused address) it goes to the dead-letter
//!   queue with the reason. When the broker refuses the outbox itself (an alarm, a
//!   reconnect), that step is retried in place with backoff, never requeued: a job's
//!   broker redelivery count grows only when a router dies (RabbitMQ 4's quorum queues
//!   drop a message past their delivery limit).
//!
//! Layout: `read` takes jobs off the notify queues, `policy_loop` starts each job's work,
//! `batch` holds and flushes `batch_notify` batches, `policy` applies the checks that need
//! Redis (rate limit, `latest_notify`, expiration counter), `send` shapes one
//! notification, hands it to [`Notifiers`] and settles the outcome (retry, dead letter),
//! and `settle` acks or requeues each job's delivery once everything it carried is
//! settled.

mod batch;
mod policy;
mod policy_loop;
mod read;
mod send;
mod settle;

use std::sync::Arc;
use std::time::Duration;

use sluice_binding::transport::TransportError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use sluice_binding::event::{Event, idempotency_key};

use crate::job::{Job, Stage};
use crate::matching::SubRef;
use crate::notify::Notifiers;
use crate::outbox::Outbox;
use crate::store::Store;
use crate::sync::SharedIndex;
use policy_loop::PolicyLoop;
use settle::Hold;

/// Settings of the delivery stage.
#[derive(Clone, Debug)]
pub struct DeliverConfig {
    /// Unsettled jobs per notify queue: the notifications this instance decides and sends
    /// at once (nothing that waits is counted in it).
    pub prefetch: u16,
    /// Delivery attempts before a notification goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each attempt (with jitter).
    pub retry_initial: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
    /// Notifications being sent at once by this instance.
    pub max_in_flight: usize,
    /// Notifications of one tenant being sent at once: a tenant whose targets are slow
    /// leaves the rest of `max_in_flight` to the others. 0: half of `max_in_flight` when
    /// the tenants file lists several tenants, else all of it.
    pub max_in_flight_per_tenant: usize,
    /// Unsettled jobs one tenant may hold per notify queue; a job beyond it waits
    /// `retry_initial` on the delay queue (`deferred`), so that a tenant whose
    /// notifications are slow cannot fill the queue's prefetch window. 0: half of
    /// `prefetch` when the tenants file lists several tenants, else all of it.
    pub max_jobs_per_tenant: usize,
    /// How often the held batches' due times are checked (one Redis query per tick and
    /// instance).
    pub tick: Duration,
}

impl Default for DeliverConfig {
    fn default() -> Self {
        Self {
            prefetch: 512,
            max_attempts: 8,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            max_in_flight: 256,
            max_in_flight_per_tenant: 0,
            max_jobs_per_tenant: 0,
            tick: Duration::from_millis(50),
        }
    }
}
impl DeliverConfig {
    /// The shares left at 0 (automatic), for `tenants` tenants: with more than one, a
    /// tenant may take half of `max_in_flight` and half of `prefetch`; alone, all.
    pub fn shared_by(mut self, tenants: usize) -> Self {
        let share = |n: usize| if tenants > 1 { n.div_ceil(2) } else { n.max(1) };
        if self.max_in_flight_per_tenant == 0 {
            self.max_in_flight_per_tenant = share(self.max_in_flight);
        }
        if self.max_jobs_per_tenant == 0 {
            self.max_jobs_per_tenant = share(usize::from(self.prefetch));
        }
        self
    }
}

/// Runs the delivery stage until `shutdown`.
pub async fn run(
    outbox: Outbox,
    store: Store,
    index: SharedIndex,
    notifiers: Notifiers,
    cfg: DeliverConfig,
    shutdown: CancellationToken,
) -> Result<(), TransportError> {
    // Without a count of tenants, each share is the whole (as for a single tenant).
    let cfg = cfg.shared_by(1);
    let consumers = outbox.consume_notify(cfg.prefetch).await?;
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel(usize::from(cfg.prefetch).max(64));
    let stop_reading = CancellationToken::new();
    for (queue, c) in consumers.into_iter().enumerate() {
        tracker.spawn(read::read(
            queue,
            c,
            tx.clone(),
            outbox.clone(),
            tracker.clone(),
            stop_reading.clone(),
        ));
    }
    drop(tx);
    let ctx = Arc::new(Ctx {
        outbox,
        store,
        notifiers,
        cfg: cfg.clone(),
        sends: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        tenant_sends: std::sync::Mutex::default(),
        tracker: tracker.clone(),
        stopping: shutdown.clone(),
    });
    let polling = tracker.spawn(batch::poll(ctx.clone(), index.clone(), shutdown.clone()));
    let mut policy = PolicyLoop {
        ctx,
        index,
        shares: std::collections::HashMap::new(),
    };
    policy.run(rx, shutdown, stop_reading).await;
    let _ = polling.await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// A job taken off a notify queue (`queue`, an index), with the hold on its delivery.
struct Incoming {
    job: Job,
    hold: Hold,
    queue: usize,
}

/// What every send task shares.
struct Ctx {
    outbox: Outbox,
    store: Store,
    notifiers: Notifiers,
    cfg: DeliverConfig,
    sends: Arc<Semaphore>,
    /// Each tenant's share of `sends`.
    tenant_sends: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
    tracker: TaskTracker,
    /// Cancelled when the stage stops: outbox steps retrying through an outage give up.
    stopping: CancellationToken,
}

impl Ctx {
    /// Waits for a send place in `tenant`'s share, then in the whole; held while sending.
    async fn send_permits(
        &self,
        tenant: &str,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let own = {
            let mut map = self.tenant_sends.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(tenant.to_owned())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(self.cfg.max_in_flight_per_tenant.max(1)))
                })
                .clone()
        };
        let own = own.acquire_owned().await.ok()?;
        let all = self.sends.clone().acquire_owned().await.ok()?;
        Some((own, all))
    }
}

/// A notification ready for the rate limit, the expiration counter and delivery.
struct Ready {
    sub: SubRef,
    events: Vec<Event>,
    key: String,
    stage: Stage,
    holds: Vec<Hold>,
}

impl Ready {
    fn new(sub: SubRef, events: Vec<Event>, stage: Stage, holds: Vec<Hold>) -> Self {
        let key = idempotency_key(sub.id, &events);
        Self {
            sub,
            events,
            key,
            stage,
            holds,
        }
    }

    fn job(&self, stage: Stage) -> Job {
        Job::new(
            self.sub.tenant.as_str(),
            self.sub.id,
            stage,
            self.events.clone(),
        )
    }
}
