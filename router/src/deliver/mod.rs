//! The delivery stage: consumes the outbox's notify queues, applies the notification
//! policies, and hands notifications to the notifiers.
//!
//! - **Holding is acking later.** A job's delivery is acked only when every notification
//!   carrying its events is settled: delivered, moved to the delay queue (retry or rate
//!   limit) or the dead-letter queue with a broker confirm, or dropped by policy
//!   (superseded under `latest_notify`, past the expiration counter, subscription gone).
//!   A job held in a batch or as a pending latest notification stays unacked on the broker,
//!   so a killed router loses nothing: its unacked jobs are delivered again. The prefetch
//!   bounds what one instance holds.
//! - **One policy loop, many sends.** Batching and pending-latest state live in one task
//!   (no locks); every ready notification is sent by a task of its own, at most
//!   `max_in_flight` at once, so a slow webhook delays only its own notifications.
//! - **Shared counters.** Rate-limit windows and expiration counters are in Redis
//!   ([`crate::store`]), so several router instances enforce one limit.
//! - **Retries are durable.** A failed delivery goes to the delay queue with its attempt
//!   count and comes back after a backoff with jitter; after `max_attempts` (or at once, for
//!   a permanent failure such as a 404 or a refused address) it goes to the dead-letter
//!   queue with the reason.
//!
//! Layout: `read` takes jobs off the notify queues, `policy_loop` batches them and
//! holds pending latest notifications, `policy` applies the checks that need Redis
//! (rate limit, expiration counter), `send` shapes one notification, hands it to
//! [`Notifiers`] and settles the outcome (retry, dead letter), and `settle` acks or
//! requeues each job's delivery once everything it carried is settled.

mod policy;
mod policy_loop;
mod read;
mod send;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_binding::transport::TransportError;
use tokio::sync::{Semaphore, mpsc};
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
    /// Unsettled jobs per notify queue; bounds what batches and pending notifications hold.
    pub prefetch: u16,
    /// Delivery attempts before a notification goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each attempt (with jitter).
    pub retry_initial: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
    /// Notifications being sent at once by this instance.
    pub max_in_flight: usize,
    /// How often batch deadlines and pending notifications are checked.
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
            tick: Duration::from_millis(20),
        }
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
    let consumers = outbox.consume_notify(cfg.prefetch).await?;
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel(usize::from(cfg.prefetch).max(64));
    let stop_reading = CancellationToken::new();
    for c in consumers {
        tracker.spawn(read::read(
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
        tracker: tracker.clone(),
    });
    let mut policy = PolicyLoop {
        ctx,
        index,
        batches: HashMap::new(),
        latest: HashMap::new(),
    };
    policy.run(rx, shutdown, stop_reading).await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// A job taken off a notify queue, with the hold on its delivery.
struct Incoming {
    job: Job,
    hold: Hold,
}

/// What every send task shares.
struct Ctx {
    outbox: Outbox,
    store: Store,
    notifiers: Notifiers,
    cfg: DeliverConfig,
    sends: Arc<Semaphore>,
    tracker: TaskTracker,
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
