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
use sluice_binding::tenancy::{Tenants, check_batch_publisher};
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
    /// Who may publish each tenant's batches (`None`: Sluice's own broker users only).
    tenants: Option<Arc<Tenants>>,
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
        tenants: Option<Arc<Tenants>>,
        stats: Arc<WorkerStats>,
    ) -> Self {
        Self {
            work,
            commit,
            limits,
            tenants,
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
            let (rx, tx, limits, tenants, stats) = (
                self.work.clone(),
                self.commit.clone(),
                self.limits,
                self.tenants.clone(),
                self.stats.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{}", self.spawned))
                .spawn(move || work(rx, retired, tx, limits, tenants.as_deref(), &stats))?;
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
    tenants: Option<&Tenants>,
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
        // A batch is stored only if its publisher may write its tenant (section 6 of the
        // binding): the tenant is known once the batch is decoded.
        let staged = stage(&d.body, d.redelivered, now_ns(), &limits).and_then(|staged| {
            check_batch_publisher(tenants, &d.publisher, &staged.0.tenant).map(|()| staged)
        });
        let out = match staged {
            Ok((batch, days)) => Staged::Store {
                batch,
                days,
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

#[cfg(test)]
mod tests {
    use sluice_binding::Topology;
    use sluice_binding::codec;
    use sluice_binding::model::BatchBuilder;
    use sluice_binding::transport::inproc::InProcessTransport;
    use sluice_binding::transport::{Outgoing, Transport};

    use super::*;

    /// Three readings of tenant acme, encoded.
    fn good() -> Vec<u8> {
        let mut b = BatchBuilder::new("acme", "workers-test", 0);
        for i in 0..3 {
            b.push("d", "m", now_ns() - 1_000_000 + i, i as f64);
        }
        codec::encode(&b.finish(now_ns())).unwrap()
    }

    /// `bodies` as real deliveries (of the in-process transport's queue `t.storage.0`),
    /// with the runtime their ackers belong to.
    fn deliveries(bodies: &[Vec<u8>]) -> (tokio::runtime::Runtime, Vec<Delivery>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ds = rt.block_on(async {
            let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 1), 64));
            t.declare(&["storage"]).await.unwrap();
            for body in bodies {
                let msg = Outgoing {
                    partition: 0,
                    body,
                    batch_id: uuid::Uuid::nil(),
                    producer: "workers-test",
                };
                t.publish(msg).await.unwrap();
            }
            let mut c = t.consume_group("storage", 64).await.unwrap().remove(0);
            let mut out = Vec::new();
            for _ in bodies {
                out.push(c.next().await.unwrap());
            }
            out
        });
        (rt, ds)
    }

    struct Harness {
        work: Sender<Delivery>,
        staged: mpsc::Receiver<Staged>,
        stats: Arc<WorkerStats>,
        set: WorkerSet,
    }

    fn harness() -> Harness {
        let (work, rx) = crossbeam_channel::bounded(16);
        let (tx, staged) = mpsc::channel(16);
        let stats = Arc::new(WorkerStats::default());
        let set = WorkerSet::new(rx, tx, Limits::default(), None, stats.clone());
        Harness {
            work,
            staged,
            stats,
            set,
        }
    }

    #[test]
    fn each_delivery_is_staged_and_handed_to_the_committer() {
        let (_rt, ds) = deliveries(&[good(), b"not msgpack".to_vec()]);
        let Harness {
            work,
            mut staged,
            stats,
            mut set,
        } = harness();
        assert_eq!(set.resize(2).unwrap(), 2);
        for d in ds {
            work.send(d).unwrap();
        }
        let (mut stored, mut refused) = (None, None);
        for _ in 0..2 {
            match staged.blocking_recv().unwrap() {
                Staged::Store {
                    batch, stage_ns, ..
                } => stored = Some((batch, stage_ns)),
                Staged::Refuse {
                    body,
                    refusal,
                    queue,
                    ..
                } => refused = Some((body, refusal, queue)),
            }
        }
        let (batch, stage_ns) = stored.expect("the good batch is staged");
        assert_eq!(batch.tenant, "acme");
        assert_eq!(batch.rows.num_rows(), 3);
        assert!(!batch.maybe_duplicate, "a first delivery");
        assert!(stage_ns > 0);
        let (body, refusal, queue) = refused.expect("the bad one is refused");
        assert_eq!(&body[..], b"not msgpack", "the original body goes on");
        assert_eq!(refusal.kind, sluice_binding::DeadLetterKind::Decode);
        assert_eq!(&*queue, "t.storage.0");
        assert_eq!(stats.processed(), 2);
        assert!(stats.busy() > Duration::ZERO);
        // The work channel closes (the consumers stopped): the workers finish and exit.
        drop(work);
        set.join();
        assert!(staged.blocking_recv().is_none(), "every worker has exited");
    }

    #[test]
    fn resizing_grows_and_retires_workers_and_every_delivery_is_still_handed_over() {
        let (_rt, ds) = deliveries(&vec![good(); 5]);
        let Harness {
            work,
            mut staged,
            stats,
            mut set,
        } = harness();
        assert_eq!(set.resize(3).unwrap(), 3);
        assert_eq!(set.len(), 3);
        assert_eq!(set.resize(1).unwrap(), 1);
        assert_eq!(set.resize(0).unwrap(), 1, "never fewer than one worker");
        assert_eq!(set.len(), 1);
        for d in ds {
            work.send(d).unwrap();
        }
        for _ in 0..5 {
            assert!(matches!(
                staged.blocking_recv().unwrap(),
                Staged::Store { .. }
            ));
        }
        drop(work);
        set.join();
        assert!(
            staged.blocking_recv().is_none(),
            "nothing handed over twice"
        );
        assert_eq!(stats.processed(), 5);
    }
}
