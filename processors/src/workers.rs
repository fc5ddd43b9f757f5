//! The pool's worker threads, resizable while deliveries flow.
//!
//! Workers take deliveries from the shared crossbeam channel, stage them (decode, validate,
//! Arrow) and hand the result to the committer. Growing the set spawns threads on the same
//! channels. Shrinking it *retires* workers: each has a retire channel, and a retired worker
//! finishes the delivery in its hands, passes it on and exits. A delivery is never dropped
//! by a resize: it stays in the shared channel (still unacked on the broker) until some
//! worker takes it, so a resize loses and duplicates nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use sluice_binding::model::now_ns;
use sluice_binding::transport::Delivery;
use sluice_binding::validate::Limits;
use tokio::sync::mpsc;

use crate::internal_events::{WorkersRunning, stage_seconds};
use crate::pool::Staged;
use crate::stage::stage;

/// The most workers a pool runs, whatever is asked: a guard against a typo starting
/// thousands of threads.
pub const MAX_WORKERS: usize = 256;

/// What the workers did, cumulatively; read by the autoscaler.
#[derive(Debug, Default)]
pub struct WorkerStats {
    processed: AtomicU64,
    busy_ns: AtomicU64,
}

impl WorkerStats {
    /// Deliveries staged.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Time spent staging, summed over workers. Time blocked handing results to a slow
    /// committer is not counted: a worker waiting on the sink is not a busy worker.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }
}

struct Worker {
    /// Dropping it retires the worker.
    retire: Sender<()>,
    thread: JoinHandle<()>,
}

/// The running workers and what a new one needs.
pub(crate) struct WorkerSet {
    work: Receiver<Delivery>,
    commit: mpsc::Sender<Staged>,
    limits: Limits,
    stats: Arc<WorkerStats>,
    running: Vec<Worker>,
    /// Retired workers finishing their last delivery; joined at shutdown.
    retired: Vec<JoinHandle<()>>,
    spawned: usize,
}

impl WorkerSet {
    pub(crate) fn new(
        work: Receiver<Delivery>,
        commit: mpsc::Sender<Staged>,
        limits: Limits,
        stats: Arc<WorkerStats>,
    ) -> Self {
        Self {
            work,
            commit,
            limits,
            stats,
            running: Vec::new(),
            retired: Vec::new(),
            spawned: 0,
        }
    }

    /// Workers running (not counting retired ones finishing a delivery).
    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }

    /// Grows or shrinks to `n` workers (1 to [`MAX_WORKERS`]); returns the count reached.
    pub(crate) fn resize(&mut self, n: usize) -> std::io::Result<usize> {
        let n = n.clamp(1, MAX_WORKERS);
        while self.running.len() < n {
            let (retire, retired) = crossbeam_channel::bounded::<()>(0);
            let (rx, tx, limits, stats) = (
                self.work.clone(),
                self.commit.clone(),
                self.limits,
                self.stats.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{}", self.spawned))
                .spawn(move || work(rx, retired, tx, limits, &stats))?;
            self.spawned += 1;
            self.running.push(Worker { retire, thread });
        }
        while self.running.len() > n {
            if let Some(w) = self.running.pop() {
                drop(w.retire);
                self.retired.push(w.thread);
            }
        }
        self.retired.retain(|t| !t.is_finished());
        WorkersRunning(self.running.len()).emit();
        Ok(self.running.len())
    }

    /// Lets every worker drain the work channel (it disconnects once the consumers have
    /// stopped) and waits for them. Workers are not retired here: what is in the channel
    /// is unacked work already received, and it is cheaper to finish than to redeliver.
    pub(crate) fn join(self) {
        let Self {
            work,
            commit,
            running,
            retired,
            ..
        } = self;
        drop((work, commit));
        for w in running {
            let _ = w.thread.join();
            drop(w.retire);
        }
        for t in retired {
            let _ = t.join();
        }
        WorkersRunning(0).emit();
    }
}

fn work(
    rx: Receiver<Delivery>,
    retired: Receiver<()>,
    tx: mpsc::Sender<Staged>,
    limits: Limits,
    stats: &WorkerStats,
) {
    let stage_hist = stage_seconds();
    loop {
        // Retirement wins over new work when both are ready, so a shrink takes effect
        // promptly under load.
        let d = crossbeam_channel::select_biased! {
            recv(retired) -> _ => return,
            recv(rx) -> d => match d {
                Ok(d) => d,
                Err(_) => return,
            },
        };
        let t0 = Instant::now();
        let out = match stage(&d.body, d.redelivered, now_ns(), &limits) {
            Ok(batch) => Staged::Store {
                batch,
                acker: d.acker,
                stage_ns: t0.elapsed().as_nanos() as u64,
            },
            Err(refusal) => Staged::Refuse {
                body: d.body,
                refusal,
                acker: d.acker,
                queue: d.queue,
            },
        };
        let took = t0.elapsed();
        stage_hist.record(took.as_secs_f64());
        stats.processed.fetch_add(1, Ordering::Relaxed);
        stats
            .busy_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        if tx.blocking_send(out).is_err() {
            return;
        }
    }
}
