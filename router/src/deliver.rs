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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lapin::BasicProperties;
use sluice_binding::model::now_ns;
use sluice_binding::transport::{Acker, Consumer, PublishError, TransportError};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::event::{self, Event, Job, Notification, Stage};
use crate::internal_events::{NotificationDelivered, NotificationDropped, NotificationSettled};
use crate::matching::SubRef;
use crate::notify::amqp::{AmqpError, AmqpNotifier};
use crate::notify::backoff;
use crate::notify::webhook::{WebhookError, WebhookNotifier};
use crate::outbox::Outbox;
use crate::store::{Expiration, Store};
use crate::subscription::Target;
use crate::sync::SharedIndex;

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
    webhook: WebhookNotifier,
    amqp: AmqpNotifier,
    cfg: DeliverConfig,
    shutdown: CancellationToken,
) -> Result<(), TransportError> {
    let consumers = outbox.consume_notify(cfg.prefetch).await?;
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel(usize::from(cfg.prefetch).max(64));
    let stop_reading = CancellationToken::new();
    for c in consumers {
        tracker.spawn(read(
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
        webhook,
        amqp,
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

/// Settles one delivery when the last notification holding it is done: acked, or requeued
/// if any of them failed to reach a durable path.
struct Settle {
    acker: Mutex<Option<Acker>>,
    failed: AtomicBool,
    tracker: TaskTracker,
}

type Hold = Arc<Settle>;

impl Settle {
    fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let acker = self.acker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(a) = acker {
            let failed = self.failed.load(Ordering::Relaxed);
            self.tracker.spawn(async move {
                let settled = if failed { a.requeue().await } else { a.ack().await };
                if let Err(e) = settled {
                    tracing::warn!(error = %e, "cannot settle a notify delivery; it will come again");
                }
            });
        }
    }
}

fn fail_all(holds: &[Hold]) {
    for h in holds {
        h.fail();
    }
}

struct Incoming {
    job: Job,
    hold: Hold,
}

async fn read(
    mut consumer: Consumer,
    tx: mpsc::Sender<Incoming>,
    outbox: Outbox,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let d = tokio::select! {
            () = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(d) = d else { break };
        match Job::decode(&d.body) {
            Ok(job) => {
                let hold = Arc::new(Settle {
                    acker: Mutex::new(Some(d.acker)),
                    failed: AtomicBool::new(false),
                    tracker: tracker.clone(),
                });
                if tx.send(Incoming { job, hold }).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                // Not ours: keep it for inspection rather than looping on it.
                tracing::warn!(error = %e, queue = %consumer.queue(), "undecodable notify job");
                let mut headers = lapin::types::FieldTable::default();
                headers.insert(
                    "x-sluice-reason".into(),
                    lapin::types::AMQPValue::LongString(format!("undecodable job: {e}").into()),
                );
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers);
                let dl = outbox
                    .transport()
                    .publish_to("", &outbox.dead_queue(), &d.body, props, true)
                    .await;
                let _ = if dl.is_ok() {
                    d.acker.ack().await
                } else {
                    d.acker.requeue().await
                };
            }
        }
    }
    consumer.cancel().await;
}

struct Ctx {
    outbox: Outbox,
    store: Store,
    webhook: WebhookNotifier,
    amqp: AmqpNotifier,
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
        let key = event::idempotency_key(sub.id, &events);
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

struct Batch {
    sub: SubRef,
    events: Vec<Event>,
    holds: Vec<Hold>,
    deadline: Instant,
}

struct Pending {
    ready: Ready,
    due: Instant,
}

/// What send tasks hand back to the policy loop.
enum Back {
    /// Rate-limited under `latest_notify`: hold it as the newest pending one.
    HoldLatest(Ready, Duration),
}

struct PolicyLoop {
    ctx: Arc<Ctx>,
    index: SharedIndex,
    batches: HashMap<Uuid, Batch>,
    latest: HashMap<Uuid, Pending>,
}

impl PolicyLoop {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
        stop_reading: CancellationToken,
    ) {
        let (back_tx, mut back_rx) = mpsc::unbounded_channel();
        let mut tick = tokio::time::interval(self.ctx.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = rx.recv() => match incoming {
                    Some(i) => self.incoming(i, &back_tx),
                    None => break,
                },
                Some(Back::HoldLatest(ready, wait)) = back_rx.recv() => self.hold_latest(ready, wait),
                _ = tick.tick() => self.due(&back_tx),
            }
        }
        // Stop taking jobs; what is held goes back to the queue for another instance (or
        // this one after a restart): requeued, not acked.
        stop_reading.cancel();
        rx.close();
        while let Some(i) = rx.recv().await {
            i.hold.fail();
        }
        for (_, b) in self.batches.drain() {
            fail_all(&b.holds);
        }
        for (_, p) in self.latest.drain() {
            fail_all(&p.ready.holds);
        }
    }

    fn incoming(&mut self, Incoming { job, hold }: Incoming, back: &mpsc::UnboundedSender<Back>) {
        let sub = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            index.get(&job.tenant, job.subscription).cloned()
        };
        let Some(sub) = sub else {
            // Deleted or expired since the match: nothing to deliver; the hold acks.
            count_dropped(&job.tenant, "subscription_gone", job.events.len());
            return;
        };
        match job.stage {
            Stage::Fresh => match sub.policy.batch_notify {
                Some(bn) => {
                    let count = bn.count() as usize;
                    let now = Instant::now();
                    let b = self.batches.entry(sub.id).or_insert_with(|| Batch {
                        sub: sub.clone(),
                        events: Vec::new(),
                        holds: Vec::new(),
                        deadline: now + bn.duration(),
                    });
                    // The subscription may have been replaced (same id, new policy).
                    b.sub = sub.clone();
                    b.events.extend(job.events);
                    b.holds.push(hold);
                    let mut full = Vec::new();
                    while b.events.len() >= count {
                        let rest = b.events.split_off(count);
                        let events = std::mem::replace(&mut b.events, rest);
                        // A job whose events straddle two notifications is held by both.
                        let holds = if b.events.is_empty() {
                            std::mem::take(&mut b.holds)
                        } else {
                            b.holds.clone()
                        };
                        full.push(Ready::new(sub.clone(), events, Stage::Fresh, holds));
                        b.deadline = now + bn.duration();
                    }
                    if b.events.is_empty() {
                        self.batches.remove(&sub.id);
                    }
                    for ready in full {
                        self.spawn_send(ready, back);
                    }
                }
                None => {
                    for e in job.events {
                        let ready =
                            Ready::new(sub.clone(), vec![e], Stage::Fresh, vec![hold.clone()]);
                        self.spawn_send(ready, back);
                    }
                }
            },
            stage @ (Stage::Pending | Stage::Retry { .. }) => {
                let ready = Ready::new(sub, job.events, stage, vec![hold]);
                self.spawn_send(ready, back);
            }
        }
    }

    fn hold_latest(&mut self, ready: Ready, wait: Duration) {
        let due = Instant::now() + wait;
        if let Some(old) = self.latest.insert(ready.sub.id, Pending { ready, due }) {
            // Superseded: latestNotify keeps only the newest; the older one is done.
            count_dropped(
                old.ready.sub.tenant.as_str(),
                "superseded",
                old.ready.events.len(),
            );
        }
    }

    fn due(&mut self, back: &mpsc::UnboundedSender<Back>) {
        let now = Instant::now();
        let expired: Vec<Uuid> = self
            .batches
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(b) = self.batches.remove(&id) {
                self.spawn_send(Ready::new(b.sub, b.events, Stage::Fresh, b.holds), back);
            }
        }
        let due: Vec<Uuid> = self
            .latest
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(p) = self.latest.remove(&id) {
                let mut ready = p.ready;
                ready.stage = Stage::Pending;
                self.spawn_send(ready, back);
            }
        }
    }

    fn spawn_send(&self, ready: Ready, back: &mpsc::UnboundedSender<Back>) {
        let (ctx, back) = (self.ctx.clone(), back.clone());
        self.ctx.tracker.spawn(async move {
            let Ok(_permit) = ctx.sends.clone().acquire_owned().await else {
                return;
            };
            send(&ctx, ready, &back).await;
        });
    }
}

async fn send(ctx: &Ctx, mut ready: Ready, back: &mpsc::UnboundedSender<Back>) {
    let tenant = ready.sub.tenant.to_string();
    let (id, policy) = (ready.sub.id, ready.sub.policy.clone());
    let mut last = false;
    if !matches!(ready.stage, Stage::Retry { .. }) {
        if let Some(rl) = &policy.rate_limit {
            match ctx.store.take_rate_slot(&tenant, id, rl, &ready.key).await {
                Ok(None) => {}
                Ok(Some(wait)) if rl.latest_notify => {
                    let _ = back.send(Back::HoldLatest(ready, wait));
                    return;
                }
                Ok(Some(wait)) => {
                    // Pending: parked on the broker until the window has room.
                    let job = ready.job(Stage::Pending);
                    match ctx.outbox.delay(&job, &ready.key, wait).await {
                        Ok(()) => count(
                            &tenant,
                            ready.sub.target.kind(),
                            "pending",
                            ready.events.len(),
                        ),
                        Err(e) => park_failed(&ready, &e),
                    }
                    return;
                }
                Err(e) => {
                    hold_back(ctx, &ready, "rate limit check", &e).await;
                    return;
                }
            }
        }
        if let Some(max) = policy.expiration_counter {
            match ctx.store.count_notification(&tenant, id, max).await {
                Ok(Expiration::Send) => {}
                Ok(Expiration::SendLast) => last = true,
                Ok(Expiration::Expired) => {
                    count_dropped(&tenant, "expired", ready.events.len());
                    return;
                }
                Err(e) => {
                    hold_back(ctx, &ready, "expiration counter", &e).await;
                    return;
                }
            }
        }
    }
    let attempt = match ready.stage {
        Stage::Retry { attempt } => attempt,
        _ => 0,
    };
    let notification = Notification {
        id: ready.key.clone(),
        subscription: id,
        tenant: tenant.clone(),
        events: std::mem::take(&mut ready.events)
            .into_iter()
            .map(|e| e.shaped(policy.content))
            .collect(),
        sent: now_ns(),
    };
    let json = serde_json::to_string(&notification).expect("a notification always serialises");
    // A retry carries the shaped events; its key depends on the event ids only.
    ready.events = notification.events;
    let target = ready.sub.target.kind();
    match deliver(ctx, &ready.sub, &ready.key, json).await {
        Ok(()) => {
            let oldest = ready.events.iter().map(|e| e.t).min().unwrap_or(0);
            NotificationDelivered {
                tenant: &tenant,
                target,
                events: ready.events.len(),
                latency_ns: now_ns() - oldest,
            }
            .emit();
        }
        Err(e) => {
            let attempt = attempt + 1;
            let reason = e.reason();
            if e.is_permanent() || attempt >= ctx.cfg.max_attempts {
                let why = if e.is_permanent() {
                    format!("permanent failure: {reason}")
                } else {
                    format!("gave up after {attempt} attempts: {reason}")
                };
                tracing::warn!(%tenant, subscription = %id, target, reason = %why, "notification dead-lettered");
                let job = ready.job(Stage::Retry { attempt });
                match ctx
                    .outbox
                    .dead_letter(&job, &ready.key, e.kind(), &why, attempt)
                    .await
                {
                    Ok(()) => count(&tenant, target, "dead", ready.events.len()),
                    Err(pe) => park_failed(&ready, &pe),
                }
            } else {
                let wait = e.retry_wait(backoff::backoff(
                    attempt,
                    ctx.cfg.retry_initial,
                    ctx.cfg.retry_max,
                    &mut rand::rng(),
                ));
                tracing::debug!(%tenant, subscription = %id, target, attempt, ?wait, %reason, "delivery failed; retrying");
                let job = ready.job(Stage::Retry { attempt });
                match ctx.outbox.delay(&job, &ready.key, wait).await {
                    Ok(()) => count(&tenant, target, "retry", ready.events.len()),
                    Err(pe) => park_failed(&ready, &pe),
                }
            }
        }
    }
    if last {
        let Ok(t) = sluice_binding::TenantId::new(tenant.clone()) else {
            return;
        };
        match ctx.store.delete(&t, id).await {
            Ok(_) => {
                tracing::info!(%tenant, subscription = %id, "expiration counter reached; subscription deleted")
            }
            Err(e) => tracing::warn!(error = %e, "cannot delete an expired subscription"),
        }
    }
}

/// A policy check needing Redis failed: the notification waits `retry_initial` on the
/// delay queue and comes back unchanged (no attempt counted). A requeue would come back at
/// once, spin for as long as Redis is out, and count broker redeliveries, which RabbitMQ
/// 4's quorum queues turn into drops past their delivery limit.
async fn hold_back(ctx: &Ctx, ready: &Ready, check: &str, e: &crate::store::StoreError) {
    let wait = ctx.cfg.retry_initial;
    tracing::warn!(error = %e, check, ?wait, "Redis failed a policy check; the notification waits on the delay queue");
    let job = ready.job(ready.stage);
    match ctx.outbox.delay(&job, &ready.key, wait).await {
        Ok(()) => count(
            ready.sub.tenant.as_str(),
            ready.sub.target.kind(),
            "deferred",
            ready.events.len(),
        ),
        Err(pe) => park_failed(ready, &pe),
    }
}

fn park_failed(ready: &Ready, e: &PublishError) {
    tracing::warn!(error = %e, "cannot publish to the outbox; requeueing the job");
    fail_all(&ready.holds);
}

/// Why a delivery to any target failed.
#[derive(Debug)]
enum DeliverError {
    Webhook(WebhookError),
    Amqp(AmqpError),
    Redis(crate::store::StoreError),
}

impl DeliverError {
    fn is_permanent(&self) -> bool {
        match self {
            DeliverError::Webhook(e) => e.is_permanent(),
            DeliverError::Amqp(e) => e.is_permanent(),
            DeliverError::Redis(_) => false,
        }
    }

    fn reason(&self) -> String {
        match self {
            DeliverError::Webhook(e) => e.reason(),
            DeliverError::Amqp(e) => e.to_string(),
            DeliverError::Redis(e) => e.to_string(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            DeliverError::Webhook(e) if e.is_permanent() => "webhook-permanent",
            DeliverError::Webhook(_) => "webhook-retries-exhausted",
            DeliverError::Amqp(AmqpError::Forbidden { .. }) => "forbidden",
            DeliverError::Amqp(_) => "amqp",
            DeliverError::Redis(_) => "redis",
        }
    }

    /// How long to wait before the next attempt, given the backoff schedule's `backoff`.
    ///
    /// A target's `Retry-After` is honoured as given. An open circuit counts as an attempt
    /// but never shortens the schedule: the breaker's next trial may be sooner than the
    /// backoff, and retrying at every trial would spend the whole attempt budget within a
    /// few `breaker_open_for` periods of an outage the budget was sized to outlast.
    fn retry_wait(&self, backoff: Duration) -> Duration {
        match self {
            DeliverError::Webhook(WebhookError::Retryable {
                retry_after: Some(after),
                ..
            }) => *after,
            DeliverError::Webhook(WebhookError::CircuitOpen { retry_in, .. }) => {
                (*retry_in).max(backoff)
            }
            _ => backoff,
        }
    }
}

async fn deliver(ctx: &Ctx, sub: &SubRef, key: &str, json: String) -> Result<(), DeliverError> {
    let tenant = sub.tenant.as_str();
    match &sub.target {
        Target::Webhook { url } => ctx
            .webhook
            .send(url, &sub.id.to_string(), key, Bytes::from(json))
            .await
            .map_err(DeliverError::Webhook),
        Target::Amqp {
            exchange,
            routing_key,
        } => ctx
            .amqp
            .send(&sub.tenant, exchange, routing_key, key, &json)
            .await
            .map_err(DeliverError::Amqp),
        Target::RedisStream { stream, maxlen } => ctx
            .store
            .xadd(tenant, stream, *maxlen, key, &json)
            .await
            .map_err(DeliverError::Redis),
        Target::Live => {
            let listeners = ctx
                .store
                .publish_live(tenant, sub.id, &json)
                .await
                .map_err(DeliverError::Redis)?;
            if listeners == 0 {
                count_dropped(tenant, "no_listener", 0);
            }
            Ok(())
        }
    }
}

/// Telemetry of a notification that was settled without being delivered.
fn count(tenant: &str, target: &'static str, outcome: &'static str, events: usize) {
    NotificationSettled {
        tenant,
        target,
        outcome,
        events,
    }
    .emit();
}

/// Telemetry of a notification dropped by policy.
fn count_dropped(tenant: &str, reason: &'static str, events: usize) {
    NotificationDropped {
        tenant,
        reason,
        events,
    }
    .emit();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(e: WebhookError) -> DeliverError {
        DeliverError::Webhook(e)
    }

    #[test]
    fn an_open_circuit_never_shortens_the_backoff_schedule() {
        let backoff = Duration::from_secs(3);
        let open = |retry_in| {
            webhook(WebhookError::CircuitOpen {
                target: "http://t:80".into(),
                retry_in,
            })
        };
        assert_eq!(
            open(Duration::from_millis(200)).retry_wait(backoff),
            backoff
        );
        assert_eq!(
            open(Duration::from_secs(20)).retry_wait(backoff),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn retry_after_is_honoured_and_other_failures_back_off() {
        let backoff = Duration::from_secs(3);
        let asked = webhook(WebhookError::Retryable {
            reason: "429".into(),
            retry_after: Some(Duration::from_millis(100)),
        });
        assert_eq!(asked.retry_wait(backoff), Duration::from_millis(100));
        let plain = webhook(WebhookError::Retryable {
            reason: "503".into(),
            retry_after: None,
        });
        assert_eq!(plain.retry_wait(backoff), backoff);
    }
}
