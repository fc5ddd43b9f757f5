//! The batcher: readings of concurrent requests, gathered into batches by size and time.
//!
//! One task owns every open batch, keyed by tenant (and by device under device-hash
//! partitioning, where every batch holds a single device). A request hands its validated
//! readings over as one [`Chunk`]; the task appends them to the open batch of their key,
//! sending that batch when it holds `max_readings` readings — so a big request spans several
//! batches — or `linger` after its first reading, whichever comes first. A batch also never
//! holds readings of more than `max_days` UTC days (the consumers refuse those): a reading
//! of a new day that would exceed them sends the open batch first. Requests are checked
//! against the same bound, so every batch makes progress.
//!
//! For every batch a chunk's readings land in, the request receives a oneshot that resolves
//! with that batch's outcome; [`Batcher::submit`] returns `Ok` only once every one of them
//! reported a broker confirm. A failure is reported at once: some batches of the request may
//! already be stored then (the caller's retry may store those readings twice — each retry
//! is a new batch id).
//!
//! Bounds and back pressure:
//! - the input is a bounded mpsc (`queue` entries, one per request): when it is full,
//!   [`Batcher::submit`] waits — the number of waiting requests is bounded by the HTTP
//!   in-flight semaphore, never by memory;
//! - sending is done by one task per flushed batch, which waits for one of
//!   `max_inflight_batches` semaphore permits before publishing and holds it until the
//!   broker confirmed; batches waiting for a permit are bounded by the requests holding
//!   them. The batcher task itself never awaits a send, so one slow confirm holds one
//!   permit, and other tenants' batches keep flowing through the other permits;
//! - under device hash, the batches of one device are published one after the other (the
//!   next waits for the previous confirm), which keeps each device's readings in order on
//!   its partition, as the binding promises.
//!
//! Shutdown is two steps, so that requests still in flight are answered quickly:
//! [`Batcher::stop_lingering`] sends every open batch at once and every later reading as
//! soon as it arrives (the HTTP server calls it when it stops accepting connections);
//! [`Batcher::shutdown`] then stops taking readings, sends what is left, and returns when
//! every send has settled.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use sluice_binding::model::{BatchBuilder, now_ns};
use sluice_binding::transport::PublishError;
use sluice_binding::validate::{DaySet, utc_day};
use sluice_binding::{Partitioning, TenantId};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use sluice_binding::producer::{Producer, SendError};

/// How often idle per-device slots are dropped under device hash.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Settings of a [`Batcher`].
#[derive(Clone, Copy, Debug)]
pub struct BatcherConfig {
    /// Readings per batch at most; a full batch is sent at once.
    pub max_readings: usize,
    /// Longest wait between a batch's first reading and its sending.
    pub linger: Duration,
    /// Batches published and awaiting their confirm at once.
    pub max_inflight_batches: usize,
    /// Capacity of the input channel, in requests.
    pub queue: usize,
    /// Distinct UTC days a batch may hold at most (the binding's `Limits::max_days`).
    pub max_days: usize,
}

/// Readings of one request, validated, column-wise with request-local dictionaries (the
/// shape of a batch without its header). Build it with [`ChunkBuilder`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chunk {
    devices: Vec<String>,
    metrics: Vec<String>,
    d: Vec<u32>,
    m: Vec<u32>,
    t: Vec<i64>,
    x: Vec<f64>,
}

impl Chunk {
    /// Number of readings.
    pub fn len(&self) -> usize {
        self.d.len()
    }

    /// The readings' timestamps, ns.
    pub fn timestamps(&self) -> &[i64] {
        &self.t
    }

    /// Whether it holds no reading.
    pub fn is_empty(&self) -> bool {
        self.d.is_empty()
    }
}

/// Builds a [`Chunk`], interning names borrowed from the request body.
#[derive(Debug, Default)]
pub struct ChunkBuilder<'a> {
    chunk: Chunk,
    device_ix: HashMap<&'a str, u32>,
    metric_ix: HashMap<&'a str, u32>,
}

impl<'a> ChunkBuilder<'a> {
    /// A builder with room for `readings` readings.
    pub fn with_capacity(readings: usize) -> Self {
        let mut b = Self::default();
        b.chunk.d.reserve(readings);
        b.chunk.m.reserve(readings);
        b.chunk.t.reserve(readings);
        b.chunk.x.reserve(readings);
        b
    }

    /// Appends a reading (timestamp in ns since the Unix epoch).
    pub fn push(&mut self, device: &'a str, metric: &'a str, ts: i64, value: f64) {
        let d = intern(&mut self.device_ix, &mut self.chunk.devices, device);
        let m = intern(&mut self.metric_ix, &mut self.chunk.metrics, metric);
        self.chunk.d.push(d);
        self.chunk.m.push(m);
        self.chunk.t.push(ts);
        self.chunk.x.push(value);
    }

    /// The chunk.
    pub fn finish(self) -> Chunk {
        self.chunk
    }
}

fn intern<'a>(ix: &mut HashMap<&'a str, u32>, dict: &mut Vec<String>, name: &'a str) -> u32 {
    *ix.entry(name).or_insert_with(|| {
        dict.push(name.to_owned());
        (dict.len() - 1) as u32
    })
}

/// Why submitted readings were not all confirmed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BatchError {
    /// A batch holding some of them was not sent.
    #[error(transparent)]
    Send(Arc<SendError>),
    /// The batcher is shutting down and takes no more readings.
    #[error("ingest is shutting down")]
    ShuttingDown,
}

type Outcome = Result<(), Arc<SendError>>;

struct Submit {
    tenant: TenantId,
    chunk: Chunk,
    reply: oneshot::Sender<Vec<oneshot::Receiver<Outcome>>>,
}

/// Handle to the batcher task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Batcher {
    tx: mpsc::Sender<Submit>,
    no_linger: CancellationToken,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Batcher {
    /// Starts the batcher task (inside a tokio runtime) sending through `producer`; it
    /// keys batches by device when the producer partitions by device hash.
    pub fn spawn(producer: Arc<Producer>, cfg: BatcherConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let stop = CancellationToken::new();
        let no_linger = CancellationToken::new();
        let tracker = TaskTracker::new();
        let run = Run {
            by_device: producer.partitioning() == Partitioning::DeviceHash,
            max_readings: cfg.max_readings.max(1),
            max_days: cfg.max_days.max(1),
            linger: cfg.linger,
            sends: Arc::new(Semaphore::new(cfg.max_inflight_batches.max(1))),
            tracker: tracker.clone(),
            producer,
            slots: HashMap::new(),
            deadlines: VecDeque::new(),
            next_gen: 0,
            last_prune: Instant::now(),
        };
        tracker.spawn(run.run(rx, no_linger.clone(), stop.clone()));
        Self {
            tx,
            no_linger,
            stop,
            tracker,
        }
    }

    /// Hands readings of `tenant` over and waits until every batch holding them was
    /// confirmed by the broker; fails as soon as one of them failed. Waits while the input
    /// channel is full.
    pub async fn submit(&self, tenant: TenantId, chunk: Chunk) -> Result<(), BatchError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let (reply, replied) = oneshot::channel();
        self.tx
            .send(Submit {
                tenant,
                chunk,
                reply,
            })
            .await
            .map_err(|_| BatchError::ShuttingDown)?;
        let outcomes = replied.await.map_err(|_| BatchError::ShuttingDown)?;
        for outcome in outcomes {
            match outcome.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(BatchError::Send(e)),
                Err(_) => return Err(BatchError::ShuttingDown),
            }
        }
        Ok(())
    }

    /// Whether the batcher stopped taking readings.
    pub fn is_closed(&self) -> bool {
        self.stop.is_cancelled() || self.tx.is_closed()
    }

    /// Sends every open batch now, and from now on every reading as soon as it arrives
    /// (no linger): requests still in flight at shutdown are answered without waiting for
    /// a linger. Readings are still taken. Idempotent.
    pub fn stop_lingering(&self) {
        self.no_linger.cancel();
    }

    /// Stops taking readings, sends every open batch now, and returns once every batch
    /// settled (confirmed or failed). Idempotent.
    pub async fn shutdown(&self) {
        self.no_linger.cancel();
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The batcher task's state.
struct Run {
    producer: Arc<Producer>,
    by_device: bool,
    max_readings: usize,
    max_days: usize,
    linger: Duration,
    sends: Arc<Semaphore>,
    tracker: TaskTracker,
    /// Tenant → key → slot; the key is the device under device hash, else "".
    slots: HashMap<TenantId, HashMap<Box<str>, Slot>>,
    /// Linger deadlines of open batches, oldest first (linger is constant, so creation
    /// order is deadline order). Entries of batches already sent for size are skipped.
    deadlines: VecDeque<Deadline>,
    next_gen: u64,
    last_prune: Instant,
}

#[derive(Default)]
struct Slot {
    open: Option<Open>,
    /// Device hash: resolves when the last batch sent for this key settled.
    last_send: Option<oneshot::Receiver<()>>,
}

struct Open {
    builder: BatchBuilder,
    /// The UTC days of the readings in `builder`.
    days: DaySet,
    waiters: Vec<oneshot::Sender<Outcome>>,
    generation: u64,
    /// The submission that registered the last waiter (one waiter per request and batch).
    last_submission: u64,
}

struct Deadline {
    at: Instant,
    tenant: TenantId,
    key: Box<str>,
    generation: u64,
}

impl Run {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Submit>,
        no_linger: CancellationToken,
        stop: CancellationToken,
    ) {
        let mut submission = 0u64;
        let mut lingering = true;
        loop {
            let next = self.deadlines.front().map(|d| d.at);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = no_linger.cancelled(), if lingering => {
                    lingering = false;
                    self.flush_all();
                }
                msg = rx.recv() => match msg {
                    Some(s) => {
                        submission += 1;
                        self.accept(s, submission);
                        if lingering {
                            // Under a steady stream of input the timer branch may not be
                            // picked; honour the linger here too.
                            self.flush_due(Instant::now());
                        } else {
                            self.flush_all();
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    self.flush_due(Instant::now());
                }
            }
        }
        // Drain: readings already handed over are sent, later submits fail.
        rx.close();
        while let Some(s) = rx.recv().await {
            submission += 1;
            self.accept(s, submission);
        }
        self.flush_all();
        tracing::debug!("batcher flushed, waiting for the last confirms");
    }

    fn accept(&mut self, submit: Submit, submission: u64) {
        let Submit {
            tenant,
            chunk,
            reply,
        } = submit;
        let mut outcomes = Vec::new();
        let now = Instant::now();
        let tenant_slots = self.slots.entry(tenant.clone()).or_default();
        for i in 0..chunk.len() {
            let device = chunk.devices[chunk.d[i] as usize].as_str();
            let metric = chunk.metrics[chunk.m[i] as usize].as_str();
            let key = if self.by_device { device } else { "" };
            if !tenant_slots.contains_key(key) {
                tenant_slots.insert(key.into(), Slot::default());
            }
            let Some(slot) = tenant_slots.get_mut(key) else {
                continue; // inserted just above
            };
            let day = utc_day(chunk.t[i]);
            if slot
                .open
                .as_ref()
                .is_some_and(|o| !o.days.contains(day) && o.days.len() >= self.max_days)
            {
                flush(
                    &self.producer,
                    &self.sends,
                    &self.tracker,
                    self.by_device,
                    slot,
                );
            }
            let open = slot.open.get_or_insert_with(|| {
                self.next_gen += 1;
                self.deadlines.push_back(Deadline {
                    at: now + self.linger,
                    tenant: tenant.clone(),
                    key: key.into(),
                    generation: self.next_gen,
                });
                Open {
                    builder: self.producer.batch(tenant.as_str()),
                    days: DaySet::default(),
                    waiters: Vec::new(),
                    generation: self.next_gen,
                    last_submission: 0,
                }
            });
            if open.last_submission != submission {
                let (tx, rx) = oneshot::channel();
                open.waiters.push(tx);
                outcomes.push(rx);
                open.last_submission = submission;
            }
            open.builder.push(device, metric, chunk.t[i], chunk.x[i]);
            open.days.insert(day);
            if open.builder.len() >= self.max_readings {
                flush(
                    &self.producer,
                    &self.sends,
                    &self.tracker,
                    self.by_device,
                    slot,
                );
            }
        }
        // The request may have gone away (client disconnected): its batches are sent anyway.
        let _ = reply.send(outcomes);
    }

    fn flush_due(&mut self, now: Instant) {
        while self.deadlines.front().is_some_and(|d| d.at <= now) {
            let Some(d) = self.deadlines.pop_front() else {
                break;
            };
            let slot = self
                .slots
                .get_mut(&d.tenant)
                .and_then(|keys| keys.get_mut(&*d.key));
            if let Some(slot) = slot
                && slot
                    .open
                    .as_ref()
                    .is_some_and(|o| o.generation == d.generation)
            {
                flush(
                    &self.producer,
                    &self.sends,
                    &self.tracker,
                    self.by_device,
                    slot,
                );
            }
        }
        if self.by_device && now.duration_since(self.last_prune) >= PRUNE_EVERY {
            self.prune();
            self.last_prune = now;
        }
    }

    /// Drops device slots with no open batch and no send in flight, so a stream of
    /// ever-new device ids does not grow the map.
    fn prune(&mut self) {
        for keys in self.slots.values_mut() {
            keys.retain(|_, slot| {
                slot.open.is_some()
                    || slot.last_send.as_mut().is_some_and(|rx| {
                        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                    })
            });
        }
        self.slots.retain(|_, keys| !keys.is_empty());
    }

    fn flush_all(&mut self) {
        for keys in self.slots.values_mut() {
            for slot in keys.values_mut() {
                flush(
                    &self.producer,
                    &self.sends,
                    &self.tracker,
                    self.by_device,
                    slot,
                );
            }
        }
        self.deadlines.clear();
    }
}

/// Sends the open batch of `slot`, if any, from a task of its own.
fn flush(
    producer: &Arc<Producer>,
    sends: &Arc<Semaphore>,
    tracker: &TaskTracker,
    by_device: bool,
    slot: &mut Slot,
) {
    let Some(open) = slot.open.take() else {
        return;
    };
    let batch = open.builder.finish(now_ns());
    let (previous, done) = if by_device {
        let (done_tx, done_rx) = oneshot::channel::<()>();
        (slot.last_send.replace(done_rx), Some(done_tx))
    } else {
        (None, None)
    };
    let producer = producer.clone();
    let sends = sends.clone();
    tracker.spawn(async move {
        // Per-device order: wait for the previous batch of this device first, and only
        // then for a permit (a waiting task must not hold one).
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        let outcome = match sends.acquire_owned().await {
            Ok(permit) => {
                let sent = producer.send(&batch).await.map_err(Arc::new);
                drop(permit);
                sent
            }
            Err(_) => Err(Arc::new(SendError::Publish {
                source: PublishError::Closed,
                attempts: 0,
            })),
        };
        for waiter in open.waiters {
            let _ = waiter.send(outcome.clone());
        }
        drop(done);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_binding::Topology;
    use sluice_binding::codec::decode;
    use sluice_binding::producer::ProducerConfig;
    use sluice_binding::transport::inproc::InProcessTransport;
    use sluice_binding::transport::{Consumer, Transport};

    const TS: i64 = 1_763_762_399_000_000_000;

    async fn setup(
        partitioning: Partitioning,
        max_readings: usize,
        linger: Duration,
        capacity: usize,
    ) -> (Batcher, Vec<Consumer>) {
        let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), capacity));
        t.declare(&["storage"]).await.unwrap();
        let consumers = t.consume_group("storage", 1000).await.unwrap();
        let producer = Producer::new(
            t,
            ProducerConfig {
                producer_id: "p".into(),
                partitioning,
                ..ProducerConfig::default()
            },
        );
        let batcher = Batcher::spawn(
            Arc::new(producer),
            BatcherConfig {
                max_readings,
                linger,
                max_inflight_batches: 16,
                queue: 16,
                max_days: 3,
            },
        );
        (batcher, consumers)
    }

    fn chunk(device: &str, n: usize, first_value: f64) -> Chunk {
        let mut b = ChunkBuilder::with_capacity(n);
        for i in 0..n {
            b.push(device, "temp", TS + i as i64, first_value + i as f64);
        }
        b.finish()
    }

    fn tenant(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    /// (tenant, devices, values) of every batch waiting in the consumers' queues.
    async fn drain(consumers: &mut [Consumer]) -> Vec<(String, Vec<String>, Vec<f64>)> {
        let mut out = Vec::new();
        for c in consumers.iter_mut() {
            while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(1), c.next()).await {
                let v = decode(&d.body).unwrap();
                out.push((
                    v.tenant.to_owned(),
                    v.d.iter()
                        .map(|i| v.devices[*i as usize].to_owned())
                        .collect(),
                    v.x.clone(),
                ));
                d.acker.ack().await.unwrap();
            }
        }
        out.sort_by(|a, b| a.2[0].total_cmp(&b.2[0]));
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_big_request_is_split_by_size_and_the_rest_waits_for_the_linger() {
        let linger = Duration::from_secs(3600);
        let (batcher, mut consumers) = setup(Partitioning::RoundRobin, 3, linger, 64).await;
        let started = Instant::now();
        batcher
            .submit(tenant("acme"), chunk("d1", 7, 0.0))
            .await
            .unwrap();
        // The 7th reading waited for the linger (virtual time).
        assert!(started.elapsed() >= linger);
        let batches = drain(&mut consumers).await;
        let sizes: Vec<usize> = batches.iter().map(|b| b.2.len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
        let values: Vec<f64> = batches.iter().flat_map(|b| b.2.clone()).collect();
        assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(batches.iter().all(|b| b.0 == "acme"));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_a_batch_within_the_linger() {
        let linger = Duration::from_millis(5);
        let (batcher, mut consumers) = setup(Partitioning::RoundRobin, 1000, linger, 64).await;
        let started = Instant::now();
        let (a, b) = tokio::join!(
            batcher.submit(tenant("acme"), chunk("d1", 2, 0.0)),
            batcher.submit(tenant("acme"), chunk("d2", 1, 10.0)),
        );
        a.unwrap();
        b.unwrap();
        assert!(started.elapsed() >= linger);
        assert!(started.elapsed() < linger * 2);
        let batches = drain(&mut consumers).await;
        assert_eq!(batches.len(), 1, "{batches:?}");
        assert_eq!(batches[0].1, ["d1", "d1", "d2"]);
        assert_eq!(batches[0].2, [0.0, 1.0, 10.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_never_holds_more_days_than_the_bound() {
        use sluice_binding::validate::NS_PER_DAY;
        // max_days = 3: four requests within the linger, on days 0, 1, 2 (two of them on
        // day 1) and 3; the one of day 3 starts a new batch.
        let (batcher, mut consumers) =
            setup(Partitioning::RoundRobin, 1000, Duration::from_millis(5), 64).await;
        let on_day = |day: i64, value: f64| {
            let mut b = ChunkBuilder::with_capacity(1);
            b.push("d1", "temp", TS - day * NS_PER_DAY, value);
            b.finish()
        };
        let (a, b, c, d, e) = tokio::join!(
            batcher.submit(tenant("acme"), on_day(0, 0.0)),
            batcher.submit(tenant("acme"), on_day(1, 1.0)),
            batcher.submit(tenant("acme"), on_day(1, 2.0)),
            batcher.submit(tenant("acme"), on_day(2, 3.0)),
            batcher.submit(tenant("acme"), on_day(3, 4.0)),
        );
        for r in [a, b, c, d, e] {
            r.unwrap();
        }
        let batches = drain(&mut consumers).await;
        let values: Vec<Vec<f64>> = batches.iter().map(|b| b.2.clone()).collect();
        assert_eq!(values, [vec![0.0, 1.0, 2.0, 3.0], vec![4.0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn tenants_never_share_a_batch() {
        let (batcher, mut consumers) =
            setup(Partitioning::RoundRobin, 1000, Duration::from_millis(5), 64).await;
        let (a, b) = tokio::join!(
            batcher.submit(tenant("acme"), chunk("d1", 2, 0.0)),
            batcher.submit(tenant("other"), chunk("d1", 2, 10.0)),
        );
        a.unwrap();
        b.unwrap();
        let batches = drain(&mut consumers).await;
        assert_eq!(batches.len(), 2);
        assert_eq!(
            (batches[0].0.as_str(), batches[0].2.as_slice()),
            ("acme", &[0.0, 1.0][..])
        );
        assert_eq!(
            (batches[1].0.as_str(), batches[1].2.as_slice()),
            ("other", &[10.0, 11.0][..])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn device_hash_batches_hold_one_device_each() {
        let (batcher, mut consumers) =
            setup(Partitioning::DeviceHash, 1000, Duration::from_millis(5), 64).await;
        let mut b = ChunkBuilder::default();
        b.push("d1", "temp", TS, 0.0);
        b.push("d2", "temp", TS, 1.0);
        b.push("d1", "hum", TS, 2.0);
        batcher.submit(tenant("acme"), b.finish()).await.unwrap();
        let batches = drain(&mut consumers).await;
        assert_eq!(batches.len(), 2, "{batches:?}");
        assert_eq!(batches[0].1, ["d1", "d1"]);
        assert_eq!(batches[0].2, [0.0, 2.0]);
        assert_eq!(batches[1].1, ["d2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_sends_open_batches_without_waiting_for_the_linger() {
        let linger = Duration::from_secs(3600);
        let (batcher, mut consumers) = setup(Partitioning::RoundRobin, 1000, linger, 64).await;
        let started = Instant::now();
        let submit = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(tenant("acme"), chunk("d1", 2, 0.0)).await }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        batcher.shutdown().await;
        submit.await.unwrap().unwrap();
        assert!(started.elapsed() < linger);
        assert_eq!(drain(&mut consumers).await.len(), 1);
        assert!(batcher.is_closed());
        let late = batcher.submit(tenant("acme"), chunk("d1", 1, 0.0)).await;
        assert!(matches!(late, Err(BatchError::ShuttingDown)), "{late:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn after_stop_lingering_readings_are_sent_at_once() {
        let linger = Duration::from_secs(3600);
        let (batcher, mut consumers) = setup(Partitioning::RoundRobin, 1000, linger, 64).await;
        let started = Instant::now();
        let open = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(tenant("acme"), chunk("d1", 1, 0.0)).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        batcher.stop_lingering();
        open.await.unwrap().unwrap();
        // Still taking readings, sent without a linger.
        batcher
            .submit(tenant("acme"), chunk("d1", 1, 1.0))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!batcher.is_closed());
        assert_eq!(drain(&mut consumers).await.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_fails_the_request() {
        // Nothing declared: every publish is unroutable.
        let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), 4));
        let producer = Producer::new(t, ProducerConfig::default());
        let batcher = Batcher::spawn(
            Arc::new(producer),
            BatcherConfig {
                max_readings: 10,
                linger: Duration::from_millis(5),
                max_inflight_batches: 4,
                queue: 4,
                max_days: 8,
            },
        );
        let err = batcher
            .submit(tenant("acme"), chunk("d1", 1, 0.0))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BatchError::Send(e) if e.kind() == "unroutable"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_partition_does_not_stall_other_devices() {
        // Queues of capacity 1 and nobody consuming: the second batch for a partition
        // blocks (like a confirm that does not come) while the other partition flows.
        let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), 1));
        t.declare(&["storage"]).await.unwrap();
        let producer = Producer::new(
            t.clone(),
            ProducerConfig {
                partitioning: Partitioning::DeviceHash,
                ..ProducerConfig::default()
            },
        );
        let batcher = Batcher::spawn(
            Arc::new(producer),
            BatcherConfig {
                max_readings: 1,
                linger: Duration::from_millis(5),
                max_inflight_batches: 8,
                queue: 8,
                max_days: 8,
            },
        );
        let on = |p: u64| {
            (0..)
                .map(|i| format!("dev-{i}"))
                .find(|d| sluice_binding::partition::fnv1a64(d.as_bytes()) % 2 == p)
                .unwrap_or_default()
        };
        let (stuck, free) = (on(0), on(1));
        // Fill partition 0, then a second batch for it hangs.
        batcher
            .submit(tenant("acme"), chunk(&stuck, 1, 0.0))
            .await
            .unwrap();
        let hanging = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(tenant("acme"), chunk(&stuck, 1, 1.0)).await }
        });
        // Another tenant on the other partition is confirmed meanwhile.
        tokio::time::timeout(
            Duration::from_secs(1),
            batcher.submit(tenant("other"), chunk(&free, 1, 2.0)),
        )
        .await
        .expect("other partition must not wait for the stuck one")
        .unwrap();
        assert!(!hanging.is_finished());
        // Consuming partition 0 unblocks it.
        let mut consumers = t.consume_group("storage", 10).await.unwrap();
        let first = consumers[0].next().await.unwrap();
        first.acker.ack().await.unwrap();
        hanging.await.unwrap().unwrap();
    }
}
