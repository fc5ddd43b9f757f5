//! The storage pool: consume every partition queue of a consumer group, turn deliveries
//! into committed rows, and ack only after the commit.
//!
//! Channels and what happens when they are full:
//! - transport → consumer task: the transport's prefetch window (`prefetch` unsettled
//!   deliveries per queue) is the back pressure; the broker stops sending.
//! - consumer tasks → workers: a crossbeam channel sized to the whole prefetch window, so a
//!   send never blocks the async runtime (every message in it is an unsettled delivery, and
//!   there are never more of those than the window).
//! - workers → committer: a tokio channel of the same size; workers block on it, which is
//!   fine on their own threads.
//! - committer → commits: at most `committers` commits in flight. The committer stages
//!   deliveries into the next commit while earlier ones write their files and log entries;
//!   with every commit slot busy it waits for one to finish, so the channel fills and the
//!   prefetch window stops the consumers.
//!
//! Concurrent commits are safe because the table serialises log entries and re-checks its
//! ledger at each one: a batch in two commits at once (a redelivery racing its original) is
//! stored by the first and skipped by the second. Each commit acks its own deliveries as
//! soon as its log entry is written.
//!
//! Shutdown order (on the token): consumers cancel (the broker stops sending), workers drain
//! what was received, the committer commits and acks it, then the pool returns. Deliveries
//! not received by then stay unacked and are redelivered to another consumer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::TimestampNanosecondType;
use bytes::Bytes;
use hdrhistogram::Histogram;
use sluice_binding::receipt::Receipt;
use sluice_binding::shutdown::{CancellationToken, TaskTracker};
use sluice_binding::transport::{Acker, DeadLetter, Transport, TransportError};
use sluice_binding::validate::{DaySet, Limits};
use sluice_sinks::StagedBatch;
use sluice_sinks::latest::LatestStore;
use sluice_sinks::table::{CommitOutcome, ReadingsTable};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::autoscale::{AutoscaleConfig, Autoscaler, Sample};
use crate::control::{Mode, PoolControl};
use crate::health::SinkHealth;
use crate::internal_events::{
    AckFailed, AutoscaleDecided, CommitDuration, CommitFailed, Committed, DeadLetterFailed,
    DeadLettered, DeliveryReceived, LatestSeriesRefused, QueueBacklog, WorkersResized,
};
use crate::latency;
use crate::workers::{WorkerSet, WorkerStats};
use sluice_binding::Refusal;
use sluice_binding::tenancy::Tenants;

/// Settings of a pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Consumer group: its partition queues are consumed (`<namespace>.<group>.<p>`).
    pub group: String,
    /// Worker threads that decode, validate and build Arrow batches, at start (within the
    /// autoscaler's bounds when there is one).
    pub workers: usize,
    /// Autoscaling of the worker count; `None` keeps it where it is set.
    pub autoscale: Option<AutoscaleConfig>,
    /// Unsettled deliveries per partition queue (`basic.qos`). Deliveries are acked only
    /// after a commit, so the window across all queues must hold more messages than one
    /// commit takes, or commits wait for `flush_interval`.
    pub prefetch: u16,
    /// Commits in flight at once, each with its own files and log entry: while one
    /// uploads and writes the log, the next is encoded. 1: one commit at a time.
    pub committers: usize,
    /// Commit once this many rows are staged.
    pub flush_rows: usize,
    /// Commit at the latest this long after the first staged row.
    pub flush_interval: Duration,
    /// Commit before the staged batches touch more `(tenant, UTC day)` partitions than
    /// this: a commit writes a file per partition, so tenants backfilling many days never
    /// make one commit (and the live readings in it) wait for hundreds of files.
    pub flush_partitions: usize,
    /// Validation bounds.
    pub limits: Limits,
    /// How often queue backlogs are sampled for `/metrics` (the autoscaler's interval
    /// instead when there is one).
    pub backlog_interval: Duration,
    /// Wait before a failed commit is tried again (doubling up to 30 s); the deliveries
    /// stay unacked meanwhile, so a sink outage neither spins nor counts redeliveries.
    pub retry_backoff: Duration,
    /// The tenants file, for its direct publishers (`amqp_users`): a batch whose broker user
    /// may not write its tenant is dead-lettered `forbidden`. `None` accepts batches from
    /// Sluice's own broker users only.
    pub tenants: Option<Arc<Tenants>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            group: "storage".to_owned(),
            workers: 2,
            autoscale: None,
            prefetch: 500,
            committers: 2,
            flush_rows: 100_000,
            flush_interval: Duration::from_secs(1),
            flush_partitions: 64,
            limits: Limits::default(),
            backlog_interval: Duration::from_secs(5),
            retry_backoff: Duration::from_secs(1),
            tenants: None,
        }
    }
}

/// Where committed rows go.
#[derive(Clone, Debug)]
pub struct Sinks {
    /// The readings table (Delta Lake, local or on an object store).
    pub table: ReadingsTable,
    /// Latest value per series.
    pub latest: LatestStore,
}

/// The pool could not run, or lost its input.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Declaring the topology or starting consumers failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A consumer ended without being asked to (connection lost beyond recovery).
    #[error("consumer of {0} ended unexpectedly")]
    ConsumerLost(String),
    /// A worker thread could not be started.
    #[error("cannot start worker thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// What a pool did, for the shutdown summary.
#[derive(Debug)]
pub struct PoolReport {
    /// Deliveries received.
    pub deliveries: u64,
    /// Rows newly committed.
    pub rows_committed: u64,
    /// Rows skipped as already stored.
    pub rows_duplicate: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// Successful commits.
    pub commits: u64,
    /// Decode + validate + Arrow per delivery (ns).
    pub stage: Histogram<u64>,
    /// Commit duration (ns).
    pub commit: Histogram<u64>,
    /// Device timestamp → committed, per row (ns).
    pub end_to_end: Histogram<u64>,
}

impl PoolReport {
    fn new() -> Self {
        Self {
            deliveries: 0,
            rows_committed: 0,
            rows_duplicate: 0,
            dead_lettered: 0,
            commits: 0,
            stage: latency::new_histogram(),
            commit: latency::new_histogram(),
            end_to_end: latency::new_histogram(),
        }
    }

    /// Counts and a percentile table of the stage latencies.
    pub fn summary(&self) -> String {
        format!(
            "deliveries {}  rows committed {}  duplicates skipped {}  dead-lettered {}  commits {}\n{}",
            self.deliveries,
            self.rows_committed,
            self.rows_duplicate,
            self.dead_lettered,
            self.commits,
            latency::table(&[
                ("stage (decode+validate)", &self.stage),
                ("commit (table+latest)", &self.commit),
                ("end-to-end (device→stored)", &self.end_to_end),
            ])
        )
    }
}

/// What a worker hands to the committer.
pub(crate) enum Staged {
    Store {
        batch: StagedBatch,
        /// The UTC days of its readings.
        days: DaySet,
        acker: Acker,
        stage_ns: u64,
    },
    Refuse {
        body: Bytes,
        refusal: Refusal,
        acker: Acker,
        queue: Arc<str>,
    },
}

/// Runs the pool until `shutdown` is cancelled (then drains and returns) or its input is
/// lost (then returns an error after committing what it had). `control` sets the worker
/// count (see [`PoolControl::new`]) and may change it while the pool runs.
pub async fn run(
    transport: Transport,
    sinks: Sinks,
    cfg: PoolConfig,
    control: PoolControl,
    shutdown: CancellationToken,
) -> Result<PoolReport, PoolError> {
    transport.declare(&[cfg.group.as_str()]).await?;
    let consumers = transport.consume_group(&cfg.group, cfg.prefetch).await?;
    let window = (consumers.len() * usize::from(cfg.prefetch.max(1))).max(1);
    tracing::info!(
        group = %cfg.group,
        queues = consumers.len(),
        workers = control.desired().workers,
        autoscale = control.autoscale().is_some(),
        prefetch = cfg.prefetch,
        "storage pool started"
    );

    let stop = shutdown.child_token();
    let lost: Arc<Mutex<Option<String>>> = Arc::default();
    let tasks = TaskTracker::new();
    let (work_tx, work_rx) = crossbeam_channel::bounded(window);
    let (commit_tx, commit_rx) = mpsc::channel(window);

    for mut consumer in consumers {
        let (tx, stop, lost) = (work_tx.clone(), stop.clone(), lost.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        consumer.cancel().await;
                        break;
                    }
                    d = consumer.next() => match d {
                        Some(d) => {
                            DeliveryReceived { redelivered: d.redelivered }.emit();
                            if let Err(crossbeam_channel::TrySendError::Full(d)) = tx.try_send(d) {
                                // Cannot happen while the channel holds the whole window; if
                                // it does, wait off the runtime rather than drop.
                                let tx = tx.clone();
                                // A send fails only once the workers are gone (shutdown); the
                                // unacked delivery then comes back from the broker.
                                let _ = tokio::task::spawn_blocking(move || {
                                    let _ = tx.send(d);
                                })
                                .await;
                            }
                        }
                        None => {
                            if !stop.is_cancelled() {
                                tracing::error!(queue = %consumer.queue(), "consumer ended unexpectedly; stopping the pool");
                                *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(consumer.queue().to_string());
                                stop.cancel();
                            }
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(work_tx);

    let stats = Arc::new(WorkerStats::default());
    let mut workers = WorkerSet::new(
        work_rx,
        commit_tx,
        cfg.limits,
        cfg.tenants.clone(),
        stats.clone(),
    );
    let running = workers.resize(control.desired().workers)?;
    control.running(running);
    WorkersResized {
        group: &cfg.group,
        from: 0,
        to: running,
        mode: control.desired().mode,
    }
    .emit();
    let supervisor = tokio::spawn(supervise(
        workers,
        stats,
        control.clone(),
        transport.clone(),
        cfg.clone(),
        stop.clone(),
    ));

    let committers = cfg.committers.max(1);
    let mut committer = Committer {
        stop: stop.clone(),
        transport: transport.clone(),
        sinks,
        group: cfg.group.clone(),
        flush_rows: cfg.flush_rows.max(1),
        // At least one batch's days, or a batch would never fit.
        flush_partitions: cfg.flush_partitions.max(cfg.limits.max_days).max(1),
        // Every commit in flight and the one being staged hold their deliveries unacked:
        // each gets a share of the window, or staging would stall on a full window.
        flush_deliveries: (window / (committers + 1)).max(1),
        committers,
        retry_backoff: cfg.retry_backoff,
        health: control.sinks().clone(),
        tasks: tasks.clone(),
        pending: Vec::new(),
        pending_rows: 0,
        pending_days: HashMap::new(),
        pending_partitions: 0,
        inflight: JoinSet::new(),
        report: PoolReport::new(),
    };
    // The committer ends when every worker has dropped its sender, so the workers are
    // drained (after the supervisor hands them back on stop) while it runs.
    let drain_workers = async {
        if let Ok(workers) = supervisor.await {
            let _ = tokio::task::spawn_blocking(move || workers.join()).await;
        }
    };
    tokio::join!(committer.run(commit_rx, cfg.flush_interval), drain_workers);
    control.running(0);

    tasks.close();
    tasks.wait().await;
    committer.sinks.table.settle().await;
    let report = committer.report;
    let lost = lost.lock().unwrap_or_else(|p| p.into_inner()).take();
    match lost {
        Some(queue) => Err(PoolError::ConsumerLost(queue)),
        None => Ok(report),
    }
}

/// Owns the workers: applies the desired count (set by hand through [`PoolControl`] or by
/// the autoscaler, which it runs), and samples the backlog for `/metrics`. Returns the
/// workers when the pool stops, for the caller to let them drain.
async fn supervise(
    mut workers: WorkerSet,
    stats: Arc<WorkerStats>,
    control: PoolControl,
    transport: Transport,
    cfg: PoolConfig,
    stop: CancellationToken,
) -> WorkerSet {
    let mut desired = control.subscribe();
    let mut autoscaler = control.autoscale().cloned().map(Autoscaler::new);
    let every = autoscaler
        .as_ref()
        .map_or(cfg.backlog_interval, |a| a.config().interval);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mode = control.desired().mode;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
                let want = *desired.borrow_and_update();
                if want.mode != mode {
                    mode = want.mode;
                    // Decisions compare consecutive samples; a hand-set count in between
                    // would make the next one wrong.
                    if let Some(a) = autoscaler.as_mut() {
                        a.reset();
                    }
                }
                let from = workers.len();
                match workers.resize(want.workers) {
                    Ok(n) => {
                        control.running(n);
                        WorkersResized { group: &cfg.group, from, to: n, mode: want.mode }.emit();
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start worker thread"),
                }
            }
            _ = tick.tick() => {
                let backlog = match transport.backlog(&cfg.group).await {
                    Ok(depths) => {
                        let mut total = 0;
                        for (queue, depth) in depths {
                            total += depth;
                            QueueBacklog { queue, depth }.emit();
                        }
                        total
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot sample backlog");
                        continue;
                    }
                };
                let Some(a) = autoscaler.as_mut() else { continue };
                if mode != Mode::Auto {
                    continue;
                }
                let d = a.decide(Sample {
                    at: std::time::Instant::now(),
                    backlog,
                    processed: stats.processed(),
                    busy: stats.busy(),
                    workers: workers.len(),
                });
                AutoscaleDecided { group: &cfg.group, decision: &d }.emit();
                // Applied through the control, like a manual change, so that a pin that
                // raced with this decision wins.
                control.autoscaled(&d);
            }
        }
    }
    workers
}

struct Committer {
    /// Ends the retries of a failing sink (the deliveries are then requeued).
    stop: CancellationToken,
    transport: Transport,
    sinks: Sinks,
    group: String,
    flush_rows: usize,
    flush_partitions: usize,
    flush_deliveries: usize,
    /// Commits in flight at most.
    committers: usize,
    retry_backoff: Duration,
    /// Where failing and recovered sinks are recorded for `/readyz`.
    health: SinkHealth,
    tasks: TaskTracker,
    pending: Vec<(StagedBatch, Acker)>,
    pending_rows: usize,
    /// The UTC days the pending batches touch, by tenant: their partitions.
    pending_days: HashMap<String, DaySet>,
    /// Partitions in `pending_days`.
    pending_partitions: usize,
    /// Commits writing now; each returns what it committed for [`Committer::account`].
    inflight: JoinSet<Option<Flushed>>,
    report: PoolReport,
}

/// A commit that reached the log (and acked its deliveries).
struct Flushed {
    batches: Vec<StagedBatch>,
    outcome: CommitOutcome,
    took: Duration,
}

impl Committer {
    async fn run(&mut self, mut rx: mpsc::Receiver<Staged>, interval: Duration) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Staged::Store { batch, days, acker, stage_ns }) => {
                        self.report.deliveries += 1;
                        let _ = self.report.stage.record(stage_ns.clamp(1_000, latency::MAX_NS));
                        if self.would_overflow(&batch.tenant, &days) {
                            self.flush().await;
                            deadline = None;
                        }
                        let known = self.pending_days.entry(batch.tenant.clone()).or_default();
                        for day in days.iter() {
                            if known.insert(day) {
                                self.pending_partitions += 1;
                            }
                        }
                        self.pending_rows += batch.rows.num_rows();
                        self.pending.push((batch, acker));
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + interval);
                        if self.pending_rows >= self.flush_rows || self.pending.len() >= self.flush_deliveries {
                            self.flush().await;
                            deadline = None;
                        }
                    }
                    Some(Staged::Refuse { body, refusal, acker, queue }) => {
                        self.report.deliveries += 1;
                        self.report.dead_lettered += 1;
                        self.dead_letter(body, refusal, acker, queue);
                    }
                    None => {
                        self.flush().await;
                        while let Some(done) = self.inflight.join_next().await {
                            self.finished(done).await;
                        }
                        return;
                    }
                },
                Some(done) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    self.finished(done).await;
                }
                _ = timer => {
                    self.flush().await;
                    deadline = None;
                }
            }
        }
    }

    /// Publishes to the dead-letter exchange, then acks; off the commit path.
    fn dead_letter(&self, body: Bytes, refusal: Refusal, acker: Acker, queue: Arc<str>) {
        let (transport, group) = (self.transport.clone(), self.group.clone());
        self.tasks.spawn(async move {
            let dl = DeadLetter {
                body: &body,
                refusal: &refusal,
                group: &group,
            };
            match transport.dead_letter(dl).await {
                Ok(()) => {
                    DeadLettered {
                        queue: &queue,
                        error: refusal.kind.as_str(),
                        reason: &refusal.reason,
                    }
                    .emit();
                    if let Err(e) = acker.ack().await {
                        AckFailed { error: &e }.emit();
                    }
                }
                Err(e) => {
                    DeadLetterFailed { error: &e }.emit();
                    let _ = acker.requeue().await;
                }
            }
        });
    }

    /// Whether adding a batch of `tenant` on `days` would take the pending commit over
    /// its partition bound.
    fn would_overflow(&self, tenant: &str, days: &DaySet) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let known = self.pending_days.get(tenant);
        let new = days
            .iter()
            .filter(|&d| !known.is_some_and(|k| k.contains(d)))
            .count();
        self.pending_partitions + new > self.flush_partitions
    }

    /// Starts a commit of what is staged, first waiting for a commit slot.
    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        while self.inflight.len() >= self.committers {
            if let Some(done) = self.inflight.join_next().await {
                self.finished(done).await;
            }
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        self.pending_days.clear();
        self.pending_partitions = 0;
        let (batches, ackers): (Vec<StagedBatch>, Vec<Acker>) = pending.into_iter().unzip();
        let retry = Retry {
            stop: self.stop.clone(),
            backoff: self.retry_backoff,
            health: self.health.clone(),
        };
        self.inflight
            .spawn(commit(self.sinks.clone(), batches, ackers, retry));
    }

    async fn finished(&mut self, done: Result<Option<Flushed>, tokio::task::JoinError>) {
        let flushed = match done {
            Ok(Some(f)) => f,
            // Requeued (the pool stopped while a sink failed).
            Ok(None) => return,
            Err(e) => {
                // A panic in a commit: its deliveries were neither acked nor requeued, so
                // the broker redelivers them when the channel closes.
                tracing::error!(error = %e, "a commit task failed");
                return;
            }
        };
        let _ = self
            .report
            .commit
            .record((flushed.took.as_nanos() as u64).clamp(1_000, latency::MAX_NS));
        self.account(&flushed.batches, &flushed.outcome).await;
        self.report.commits += 1;
    }

    /// Metrics, end-to-end latency and receipts of a commit, per tenant.
    async fn account(&mut self, batches: &[StagedBatch], outcome: &CommitOutcome) {
        let written: HashMap<uuid::Uuid, u64> = outcome
            .tenants
            .values()
            .flat_map(|t| t.batches.iter().map(|b| (b.batch_id, b.rows_written)))
            .collect();
        let committed = outcome.committed_ns;
        let mut per_tenant: HashMap<&str, Histogram<u64>> = HashMap::new();
        for b in batches {
            let n = written.get(&b.batch_id).copied().unwrap_or(0) as usize;
            if n == 0 {
                continue;
            }
            let h = per_tenant
                .entry(b.tenant.as_str())
                .or_insert_with(latency::new_histogram);
            let ts = b.rows.column(2).as_primitive::<TimestampNanosecondType>();
            // A batch is committed whole or skipped whole: n is 0 or all of its rows.
            for t in ts.values().iter().take(n) {
                latency::record(h, committed - t);
            }
        }
        for (tenant, t) in &outcome.tenants {
            self.report.rows_committed += t.rows_written;
            self.report.rows_duplicate += t.rows_skipped;
            let empty = latency::new_histogram();
            let h = per_tenant.get(tenant.as_str()).unwrap_or(&empty);
            let _ = self.report.end_to_end.add(h);
            Committed {
                tenant,
                rows_written: t.rows_written,
                rows_skipped: t.rows_skipped,
                files: t.files_written,
                end_to_end: h,
            }
            .emit();
            if t.rows_written > 0 {
                let receipt = Receipt {
                    tenant: tenant.clone(),
                    rows: t.rows_written,
                    committed,
                    latency: latency::serialize(h),
                };
                if let Err(e) = self.transport.publish_receipt(&receipt).await {
                    tracing::debug!(error = %e, "cannot publish receipt");
                }
            }
        }
    }
}

/// How a failing commit waits before its next try.
struct Retry {
    /// Ends the retries (the deliveries are then requeued).
    stop: CancellationToken,
    backoff: Duration,
    health: SinkHealth,
}

impl Retry {
    /// A sink failed: waits before the next try, from `backoff` doubling up to
    /// [`MAX_RETRY_BACKOFF`], and says whether to try again (not once the pool stops).
    ///
    /// The deliveries stay unacked meanwhile: the commit slot stays taken, the
    /// channel to the committer fills and the prefetch stops the consumers. A requeue
    /// instead would come back at once and count a redelivery each time, which RabbitMQ 4's
    /// quorum queues turn into a dead letter past their delivery limit: no sink outage may
    /// turn an accepted reading into one.
    async fn wait(
        &self,
        sink: &'static str,
        e: &(dyn std::error::Error + Send + Sync),
        deliveries: usize,
        attempt: &mut u32,
    ) -> bool {
        let wait = self
            .backoff
            .saturating_mul(1 << (*attempt).min(16))
            .min(MAX_RETRY_BACKOFF);
        *attempt += 1;
        self.health.failed(sink, &e.to_string());
        CommitFailed {
            sink,
            error: e,
            deliveries,
            retry_in: wait,
        }
        .emit();
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }
}

/// One commit: the table, then the latest values, then the acks. `None` when the pool
/// stopped while a sink failed (the deliveries were requeued).
async fn commit(
    sinks: Sinks,
    batches: Vec<StagedBatch>,
    ackers: Vec<Acker>,
    retry: Retry,
) -> Option<Flushed> {
    let t0 = Instant::now();
    let mut attempt = 0;
    let outcome = loop {
        match sinks.table.commit(batches.clone()).await {
            Ok(o) => {
                retry.health.succeeded("table");
                break o;
            }
            Err(e) => {
                if !retry.wait("table", &e, ackers.len(), &mut attempt).await {
                    requeue(ackers).await;
                    return None;
                }
            }
        }
    };
    // The table holds the rows from here on; a retry (or a redelivery after a stop)
    // skips them there and writes the latest values again.
    loop {
        match sinks.latest.update(&batches).await {
            Ok(refused) => {
                retry.health.succeeded("latest");
                LatestSeriesRefused(&refused).emit();
                break;
            }
            Err(e) => {
                if !retry.wait("latest", &e, ackers.len(), &mut attempt).await {
                    requeue(ackers).await;
                    return None;
                }
            }
        }
    }
    let took = t0.elapsed();
    CommitDuration(took).emit();
    futures_ack(ackers).await;
    Some(Flushed {
        batches,
        outcome,
        took,
    })
}

/// Longest wait between two tries of a failing sink.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Gives deliveries back to the broker (the pool stops while a sink fails).
async fn requeue(ackers: Vec<Acker>) {
    for a in ackers {
        let _ = a.requeue().await;
    }
}

/// Acks every delivery concurrently (each ack is one frame; waiting for them one by one
/// would serialise on the channel's I/O).
fn futures_ack(ackers: Vec<Acker>) -> impl std::future::Future<Output = ()> {
    let futs: Vec<_> = ackers.into_iter().map(|a| a.ack()).collect();
    async move {
        for r in futures::future::join_all(futs).await {
            if let Err(e) = r {
                AckFailed { error: &e }.emit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The pool on the in-process transport, with the readings table in a temporary directory
    //! and the in-memory latest-value store: the same contract as over AMQP, no services.

    use std::path::Path;

    use sluice_binding::Topology;
    use sluice_binding::codec;
    use sluice_binding::model::{BatchBuilder, now_ns};
    use sluice_binding::transport::Outgoing;
    use sluice_binding::transport::inproc::InProcessTransport;
    use sluice_sinks::table::TableConfig;
    use std::future::Future;
    use tokio::task::JoinHandle;

    use super::*;

    const READINGS: usize = 10;

    fn transport() -> (Transport, InProcessTransport) {
        let inproc = InProcessTransport::new(Topology::new("t", 2), 64);
        (Transport::InProcess(inproc.clone()), inproc)
    }

    async fn sinks(root: &Path) -> Sinks {
        let table = ReadingsTable::open(TableConfig {
            store: root.to_str().unwrap().to_owned(),
            ..TableConfig::default()
        })
        .await
        .unwrap();
        Sinks {
            table,
            latest: LatestStore::memory(),
        }
    }

    fn config() -> PoolConfig {
        PoolConfig {
            flush_interval: Duration::from_millis(50),
            retry_backoff: Duration::from_millis(10),
            ..PoolConfig::default()
        }
    }

    /// A batch of `READINGS` readings of device `dev-{seq}`, values 0.., encoded.
    fn batch(seq: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new("acme", "pool-test", seq);
        let ts = now_ns() - 1_000_000_000;
        for i in 0..READINGS {
            b.push(
                &format!("dev-{seq}"),
                "temp",
                ts + i as i64 * 1_000,
                i as f64,
            );
        }
        codec::encode(&b.finish(now_ns())).unwrap()
    }

    /// Declares the storage group (as the pool will) and publishes `bodies` round robin.
    async fn publish(t: &Transport, bodies: &[Vec<u8>]) {
        t.declare(&["storage"]).await.unwrap();
        for (i, body) in bodies.iter().enumerate() {
            t.publish(Outgoing {
                partition: i as u32 % 2,
                body,
                batch_id: uuid::Uuid::nil(),
                producer: "pool-test",
            })
            .await
            .unwrap();
        }
    }

    struct Running {
        control: PoolControl,
        stop: CancellationToken,
        pool: JoinHandle<Result<PoolReport, PoolError>>,
    }

    fn start(t: &Transport, sinks: &Sinks, cfg: PoolConfig) -> Running {
        let control = PoolControl::for_pool(&cfg);
        let stop = CancellationToken::new();
        let pool = tokio::spawn(run(
            t.clone(),
            sinks.clone(),
            cfg,
            control.clone(),
            stop.clone(),
        ));
        Running {
            control,
            stop,
            pool,
        }
    }

    impl Running {
        async fn stop(self) -> PoolReport {
            self.stop.cancel();
            self.pool.await.unwrap().unwrap()
        }
    }

    /// Messages left in the storage queues: unacked deliveries come back there.
    async fn backlog(t: &Transport) -> u64 {
        t.backlog("storage")
            .await
            .unwrap()
            .iter()
            .map(|q| q.1)
            .sum()
    }

    /// Waits up to 10 s for `ready`.
    async fn wait_for<F: Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) {
        sluice_testkit::wait::wait_for(what, Duration::from_secs(10), || {
            let ready = ready();
            async move { ready.await.then_some(()) }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_every_delivery_then_acks_it_and_publishes_a_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = transport();
        let sinks = sinks(dir.path()).await;
        let mut receipts = t.subscribe_receipts(16).await.unwrap();
        let bodies: Vec<Vec<u8>> = (0..6).map(batch).collect();
        publish(&t, &bodies).await;
        let pool = start(&t, &sinks, config());

        let mut receipted = 0;
        while receipted < 6 * READINGS as u64 {
            let r = tokio::time::timeout(Duration::from_secs(10), receipts.recv())
                .await
                .expect("a receipt per commit")
                .unwrap();
            assert_eq!(r.tenant, "acme");
            receipted += r.rows;
        }
        // Committed: the latest values are there, one per device.
        for seq in 0..6 {
            let latest = sinks
                .latest
                .get("acme", &format!("dev-{seq}"))
                .await
                .unwrap();
            assert_eq!(latest.len(), 1);
            assert_eq!(latest[0].value, (READINGS - 1) as f64);
        }
        let report = pool.stop().await;
        assert_eq!(report.deliveries, 6);
        assert_eq!(report.rows_committed, 6 * READINGS as u64);
        assert_eq!(report.rows_duplicate, 0);
        assert_eq!(report.dead_lettered, 0);
        assert!(report.commits >= 1);
        // Acked: nothing came back to the queues when the consumers went away.
        assert_eq!(backlog(&t).await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_deliveries_are_dead_lettered_with_their_reason_and_kind_then_acked() {
        let dir = tempfile::tempdir().unwrap();
        let (t, inproc) = transport();
        let sinks = sinks(dir.path()).await;
        let mut future = BatchBuilder::new("acme", "pool-test", 0);
        future.push("d", "m", now_ns(), 1.0);
        let mut future = future.finish(now_ns());
        future.v = 2;
        let mut stale = BatchBuilder::new("acme", "pool-test", 0);
        stale.push("d", "m", 1_000, 1.0);
        let bodies = vec![
            b"not msgpack".to_vec(),
            codec::encode(&future).unwrap(),
            codec::encode(&stale.finish(now_ns())).unwrap(),
            batch(1),
        ];
        publish(&t, &bodies).await;
        let pool = start(&t, &sinks, config());

        wait_for("three dead letters", || async {
            inproc.dead_letters().len() == 3
        })
        .await;
        let mut dead: Vec<(String, String, String, Vec<u8>)> = inproc
            .dead_letters()
            .into_iter()
            .map(|d| {
                (
                    d.kind.as_str().to_owned(),
                    d.reason,
                    d.group,
                    d.body.to_vec(),
                )
            })
            .collect();
        dead.sort();
        assert_eq!(dead[0].0, "decode");
        assert_eq!(dead[0].3, b"not msgpack", "the original body is kept");
        assert_eq!(dead[1].0, "invalid");
        assert!(dead[1].1.contains("invalid batch"), "{}", dead[1].1);
        assert_eq!(dead[2].0, "unsupported-version");
        assert!(dead[2].1.contains("version 2"), "{}", dead[2].1);
        assert!(dead.iter().all(|d| d.2 == "storage"));
        // The good batch next to them is stored.
        wait_for("the good batch", || async {
            !sinks.latest.get("acme", "dev-1").await.unwrap().is_empty()
        })
        .await;
        let report = pool.stop().await;
        assert_eq!(report.deliveries, 4);
        assert_eq!(report.dead_lettered, 3);
        assert_eq!(report.rows_committed, READINGS as u64);
        assert_eq!(backlog(&t).await, 0, "dead-lettered deliveries are acked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resizing_while_deliveries_flow_loses_and_duplicates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = transport();
        let sinks = sinks(dir.path()).await;
        t.declare(&["storage"]).await.unwrap();
        let pool = start(&t, &sinks, config());
        wait_for("two workers", || async {
            pool.control.status().workers == 2
        })
        .await;
        let mut seq = 0;
        for n in [4usize, 1, 3] {
            let bodies: Vec<Vec<u8>> = (seq..seq + 10).map(batch).collect();
            seq += 10;
            publish(&t, &bodies).await;
            let status = pool.control.set_workers(n).unwrap();
            assert_eq!((status.desired, status.mode), (n, Mode::Manual));
            wait_for(&format!("{n} workers"), || async {
                pool.control.status().workers == n
            })
            .await;
        }
        wait_for("every batch stored", || async {
            let mut stored = 0;
            for s in 0..seq {
                stored += usize::from(
                    !sinks
                        .latest
                        .get("acme", &format!("dev-{s}"))
                        .await
                        .unwrap()
                        .is_empty(),
                );
            }
            stored == seq as usize
        })
        .await;
        let report = pool.stop().await;
        assert_eq!(report.deliveries, seq);
        assert_eq!(report.rows_committed, seq * READINGS as u64);
        assert_eq!(report.rows_duplicate, 0);
        assert_eq!(backlog(&t).await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_commits_and_acks_what_was_received() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = transport();
        let sinks = sinks(dir.path()).await;
        let bodies: Vec<Vec<u8>> = (0..20).map(batch).collect();
        publish(&t, &bodies).await;
        // No flush would come for a minute: only the drain at shutdown commits.
        let cfg = PoolConfig {
            flush_interval: Duration::from_secs(60),
            ..config()
        };
        let pool = start(&t, &sinks, cfg);
        wait_for("every delivery received", || async {
            backlog(&t).await == 0
        })
        .await;
        assert!(sinks.latest.get("acme", "dev-0").await.unwrap().is_empty());
        let control = pool.control.clone();
        let report = pool.stop().await;
        assert_eq!(report.deliveries, 20);
        assert_eq!(report.rows_committed, 20 * READINGS as u64);
        assert_eq!(report.commits, 1);
        assert_eq!(control.status().workers, 0, "a stopped pool runs no worker");
        assert_eq!(backlog(&t).await, 0, "drained deliveries are acked");
        assert_eq!(sinks.latest.get("acme", "dev-19").await.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_touches_at_most_flush_partitions_partitions() {
        use sluice_binding::validate::NS_PER_DAY;
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = transport();
        let sinks = sinks(dir.path()).await;
        // Six backfill batches, each one reading on each of 8 days of its own: 48
        // partitions in all, which one commit would take without the bound.
        let now = now_ns();
        let bodies: Vec<Vec<u8>> = (0..6i64)
            .map(|k| {
                let mut b = BatchBuilder::new("acme", "pool-test", k as u64);
                for day in 0..8 {
                    b.push("dev", "temp", now - (k * 8 + day + 1) * NS_PER_DAY, 1.0);
                }
                codec::encode(&b.finish(now)).unwrap()
            })
            .collect();
        publish(&t, &bodies).await;
        let cfg = PoolConfig {
            flush_interval: Duration::from_secs(60),
            flush_partitions: 20,
            ..config()
        };
        let pool = start(&t, &sinks, cfg);
        wait_for("every delivery received", || async {
            backlog(&t).await == 0
        })
        .await;
        let report = pool.stop().await;
        assert_eq!(report.rows_committed, 48);
        // Two batches (16 partitions) per commit; a third would make 24.
        assert_eq!(report.commits, 3);
        let log = dir.path().join("_delta_log");
        let mut most = 0;
        for entry in std::fs::read_dir(&log).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                most = most.max(text.lines().filter(|l| l.starts_with("{\"add\"")).count());
            }
        }
        assert_eq!(most, 16, "files in the largest commit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_sink_holds_its_deliveries_unacked_and_requeues_them_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = transport();
        let root = dir.path().join("store");
        let sinks = sinks(&root).await;
        // The store's root is a file now: every commit fails.
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::write(&root, b"").unwrap();
        let bodies: Vec<Vec<u8>> = (0..4).map(batch).collect();
        publish(&t, &bodies).await;
        let pool = start(&t, &sinks, config());
        wait_for("every delivery received", || async {
            backlog(&t).await == 0
        })
        .await;
        // Retried in place: the deliveries stay in the pool's hands.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(backlog(&t).await, 0, "held, not requeued, while retrying");
        // And /readyz says why.
        let problems = pool.control.sinks().problems();
        assert!(
            problems.iter().any(|p| p.starts_with("sink table failing")),
            "{problems:?}"
        );
        let report = pool.stop().await;
        assert_eq!(report.rows_committed, 0);
        assert_eq!(report.commits, 0);
        // Never acked: back in the queues, redelivered, for the next consumer.
        assert_eq!(backlog(&t).await, 4);
        let mut consumers = t.consume_group("storage", 8).await.unwrap();
        for c in &mut consumers {
            for _ in 0..2 {
                let d = c.next().await.unwrap();
                assert!(d.redelivered);
                d.acker.ack().await.unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_store_a_repeated_batch_once() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = transport();
        let sinks = sinks(dir.path()).await;
        // Every batch twice, in a row (the second lands on the other partition): with a
        // window of 4 and 4 commits in flight, each delivery is a commit of its own, so the
        // two copies race in concurrent commits.
        let bodies: Vec<Vec<u8>> = (0..40)
            .flat_map(|seq| {
                // The same bytes twice: one batch id.
                let b = batch(seq);
                [b.clone(), b]
            })
            .collect();
        publish(&t, &bodies).await;
        let pool = start(
            &t,
            &sinks,
            PoolConfig {
                committers: 4,
                prefetch: 2,
                ..config()
            },
        );
        let want = 40 * READINGS as u64;
        let root = dir.path().to_owned();
        wait_for("every batch stored and every delivery received", || {
            let (t, root) = (t.clone(), root.clone());
            async move {
                backlog(&t).await == 0 && sluice_testkit::store::total(&root, "acme").await == want
            }
        })
        .await;
        let report = pool.stop().await;
        assert_eq!(report.deliveries, 80);
        assert_eq!(report.rows_committed, want, "{}", report.summary());
        assert_eq!(report.rows_duplicate, want);
        assert!(report.commits >= 40, "{}", report.summary());
        assert_eq!(sluice_testkit::store::total(dir.path(), "acme").await, want);
        assert_eq!(
            sluice_testkit::store::distinct(dir.path(), "acme").await,
            want
        );
        assert_eq!(backlog(&t).await, 0);
    }
}
