//! The in-process transport of the embedded mode: the same contract as AMQP, on bounded
//! tokio channels inside one process.
//!
//! - Publishing to partition `p` enqueues the batch on queue `p` of every declared group,
//!   waiting while a queue is full (back pressure; never a drop). Returning is the confirm.
//! - A consumer holds at most `prefetch` unsettled deliveries (a semaphore permit travels
//!   with each delivery), as `basic.qos` does on the broker.
//! - Requeued or dropped-unsettled deliveries come back with `redelivered = true`.
//! - Dead letters are kept in a bounded in-memory ring (the newest 10 000) and counted.
//! - There is one consumer per queue; cancelling or dropping it hands the queue back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};

use super::{
    Consumer, ConsumerInner, DeadLetter, Delivery, Outgoing, PublishError, TransportError,
};
use crate::dead_letter::DeadLetterKind;
use crate::receipt::Receipt;
use crate::tenancy::Publisher;
use crate::topology::Topology;

const DEAD_LETTER_RING: usize = 10_000;

/// In-process transport: cheap to clone.
#[derive(Clone, Debug)]
pub struct InProcessTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    topology: Topology,
    capacity: usize,
    groups: Mutex<HashMap<String, Arc<[Queue]>>>,
    dead: Mutex<VecDeque<DeadLetterRecord>>,
    receipts: broadcast::Sender<Receipt>,
}

#[derive(Debug)]
struct Queue {
    name: Arc<str>,
    tx: mpsc::Sender<Msg>,
    rx: Arc<Mutex<Option<mpsc::Receiver<Msg>>>>,
}

#[derive(Debug)]
struct Msg {
    body: Bytes,
    redelivered: bool,
}

/// A dead-lettered message, kept for inspection.
#[derive(Clone, Debug)]
pub struct DeadLetterRecord {
    /// The original body.
    pub body: Bytes,
    /// Why it was refused.
    pub reason: String,
    /// Its stable kind.
    pub kind: DeadLetterKind,
    /// The consumer group that refused it.
    pub group: String,
}

impl InProcessTransport {
    /// A transport whose queues hold at most `capacity` messages each.
    pub fn new(topology: Topology, capacity: usize) -> Self {
        let (receipts, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                topology,
                capacity: capacity.max(1),
                groups: Mutex::new(HashMap::new()),
                dead: Mutex::new(VecDeque::new()),
                receipts,
            }),
        }
    }

    /// The topology served.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<[Queue]>>> {
        self.inner.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn declare(&self, groups: &[&str]) {
        let topo = &self.inner.topology;
        let mut map = self.groups();
        for g in groups {
            map.entry((*g).to_owned()).or_insert_with(|| {
                (0..topo.partitions)
                    .map(|p| {
                        let (tx, rx) = mpsc::channel(self.inner.capacity);
                        Queue {
                            name: Arc::from(topo.partition_queue(g, p).as_str()),
                            tx,
                            rx: Arc::new(Mutex::new(Some(rx))),
                        }
                    })
                    .collect()
            });
        }
    }

    pub(super) async fn publish(&self, msg: Outgoing<'_>) -> Result<(), PublishError> {
        let targets: Vec<Arc<[Queue]>> = self.groups().values().cloned().collect();
        if targets.is_empty() || msg.partition >= self.inner.topology.partitions {
            return Err(PublishError::Unroutable(msg.partition));
        }
        let body = Bytes::copy_from_slice(msg.body);
        for queues in targets {
            let q = &queues[msg.partition as usize];
            q.tx.send(Msg {
                body: body.clone(),
                redelivered: false,
            })
            .await
            .map_err(|_| PublishError::Closed)?;
        }
        Ok(())
    }

    pub(super) fn dead_letter(&self, dl: DeadLetter<'_>) {
        tracing::warn!(
            group = dl.group,
            error = %dl.refusal.kind,
            reason = dl.refusal.reason,
            "dead-lettered"
        );
        let mut dead = self.inner.dead.lock().unwrap_or_else(|p| p.into_inner());
        if dead.len() == DEAD_LETTER_RING {
            dead.pop_front();
        }
        dead.push_back(DeadLetterRecord {
            body: Bytes::copy_from_slice(dl.body),
            reason: dl.refusal.reason.clone(),
            kind: dl.refusal.kind,
            group: dl.group.to_owned(),
        });
    }

    /// The newest dead letters (at most 10 000).
    pub fn dead_letters(&self) -> Vec<DeadLetterRecord> {
        let dead = self.inner.dead.lock().unwrap_or_else(|p| p.into_inner());
        dead.iter().cloned().collect()
    }

    pub(super) fn publish_receipt(&self, receipt: &Receipt) {
        // No receiver is fine: receipts are transient.
        let _ = self.inner.receipts.send(receipt.clone());
    }

    pub(super) fn subscribe_receipts(&self, capacity: usize) -> mpsc::Receiver<Receipt> {
        let mut sub = self.inner.receipts.subscribe();
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(async move {
            loop {
                match sub.recv().await {
                    Ok(r) => {
                        if tx.send(r).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "receipt subscriber fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        rx
    }

    pub(super) fn consume_group(
        &self,
        group: &str,
        prefetch: u16,
    ) -> Result<Vec<Consumer>, TransportError> {
        let queues = self
            .groups()
            .get(group)
            .cloned()
            .ok_or_else(|| TransportError::UnknownGroup(group.to_owned()))?;
        let mut out = Vec::with_capacity(queues.len());
        for q in queues.iter() {
            let rx =
                q.rx.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .ok_or_else(|| TransportError::AlreadyConsumed(q.name.to_string()))?;
            out.push(Consumer {
                queue: q.name.clone(),
                inner: ConsumerInner::InProcess(InProcessConsumer {
                    rx: Some(rx),
                    slot: q.rx.clone(),
                    requeue: q.tx.clone(),
                    permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
                }),
            });
        }
        Ok(out)
    }

    pub(super) fn backlog(&self, group: &str) -> Result<Vec<(String, u64)>, TransportError> {
        let queues = self
            .groups()
            .get(group)
            .cloned()
            .ok_or_else(|| TransportError::UnknownGroup(group.to_owned()))?;
        Ok(queues
            .iter()
            .map(|q| {
                let depth = q.tx.max_capacity() - q.tx.capacity();
                (q.name.to_string(), depth as u64)
            })
            .collect())
    }
}

/// Consumer of one in-process queue.
#[derive(Debug)]
pub(super) struct InProcessConsumer {
    rx: Option<mpsc::Receiver<Msg>>,
    /// Where the receiver goes back when this consumer is cancelled or dropped.
    slot: Arc<Mutex<Option<mpsc::Receiver<Msg>>>>,
    requeue: mpsc::Sender<Msg>,
    permits: Arc<Semaphore>,
}

impl InProcessConsumer {
    pub(super) async fn next(&mut self, queue: Arc<str>) -> Option<Delivery> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let msg = self.rx.as_mut()?.recv().await?;
        Some(Delivery {
            body: msg.body.clone(),
            redelivered: msg.redelivered,
            queue,
            // Only this process publishes on the in-process transport.
            publisher: Publisher::Sluice,
            acker: super::Acker::InProcess(InProcessAcker {
                permit: Some(permit),
                pending: Some((self.requeue.clone(), msg.body)),
            }),
        })
    }

    pub(super) fn cancel(&mut self) {
        if let Some(rx) = self.rx.take() {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        }
    }
}

impl Drop for InProcessConsumer {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Settles an in-process delivery; dropped unsettled, it requeues.
#[derive(Debug)]
pub struct InProcessAcker {
    permit: Option<OwnedSemaphorePermit>,
    pending: Option<(mpsc::Sender<Msg>, Bytes)>,
}

impl InProcessAcker {
    pub(super) fn ack(mut self) {
        self.pending = None;
        self.permit = None;
    }

    pub(super) fn requeue(self) {
        // Drop does it.
    }
}

impl Drop for InProcessAcker {
    fn drop(&mut self) {
        if let Some((tx, body)) = self.pending.take() {
            let msg = Msg {
                body,
                redelivered: true,
            };
            if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
                // The queue is full: hand it back from a task rather than block here.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tx.send(msg).await;
                    });
                }
            }
        }
        // The permit is released after the message is back in the queue.
        self.permit.take();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Outgoing, Transport};
    use super::*;
    use crate::dead_letter::Refusal;
    use std::time::Duration;
    use uuid::Uuid;

    fn transport(cap: usize) -> Transport {
        Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), cap))
    }

    fn out(p: u32, body: &[u8]) -> Outgoing<'_> {
        Outgoing {
            partition: p,
            body,
            batch_id: Uuid::nil(),
            producer: "p",
        }
    }

    #[tokio::test]
    async fn every_group_gets_every_batch_on_its_partition() {
        let t = transport(8);
        t.declare(&["a", "b"]).await.unwrap();
        t.publish(out(1, b"x")).await.unwrap();
        for g in ["a", "b"] {
            let mut cs = t.consume_group(g, 4).await.unwrap();
            let d = cs[1].next().await.unwrap();
            assert_eq!(&d.body[..], b"x");
            assert!(!d.redelivered);
            assert_eq!(&*d.queue, format!("t.{g}.1"));
            d.acker.ack().await.unwrap();
        }
    }

    #[tokio::test]
    async fn unroutable_without_groups_or_bad_partition() {
        let t = transport(8);
        assert!(matches!(
            t.publish(out(0, b"x")).await,
            Err(PublishError::Unroutable(0))
        ));
        t.declare(&["a"]).await.unwrap();
        assert!(matches!(
            t.publish(out(5, b"x")).await,
            Err(PublishError::Unroutable(5))
        ));
    }

    #[tokio::test]
    async fn full_queue_blocks_the_publisher() {
        let t = transport(1);
        t.declare(&["a"]).await.unwrap();
        t.publish(out(0, b"1")).await.unwrap();
        let blocked =
            tokio::time::timeout(Duration::from_millis(50), t.publish(out(0, b"2"))).await;
        assert!(blocked.is_err(), "second publish must wait for room");
        assert_eq!(t.backlog("a").await.unwrap()[0], ("t.a.0".to_owned(), 1));
    }

    #[tokio::test]
    async fn prefetch_bounds_unsettled_deliveries_and_requeue_redelivers() {
        let t = transport(8);
        t.declare(&["a"]).await.unwrap();
        for b in [b"1", b"2"] {
            t.publish(out(0, b)).await.unwrap();
        }
        let mut c = t.consume_group("a", 1).await.unwrap().remove(0);
        let first = c.next().await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(50), c.next()).await;
        assert!(waiting.is_err(), "prefetch 1 allows one unsettled delivery");
        first.acker.requeue().await.unwrap();
        let second = c.next().await.unwrap();
        assert_eq!(&second.body[..], b"2");
        second.acker.ack().await.unwrap();
        let again = c.next().await.unwrap();
        assert_eq!(&again.body[..], b"1");
        assert!(again.redelivered);
        drop(again); // unsettled: comes back
        let third = c.next().await.unwrap();
        assert!(third.redelivered);
        third.acker.ack().await.unwrap();
    }

    #[tokio::test]
    async fn one_consumer_per_queue_until_cancelled() {
        let t = transport(8);
        t.declare(&["a"]).await.unwrap();
        let mut cs = t.consume_group("a", 1).await.unwrap();
        assert!(matches!(
            t.consume_group("a", 1).await,
            Err(TransportError::AlreadyConsumed(_))
        ));
        for c in &mut cs {
            c.cancel().await;
        }
        assert_eq!(t.consume_group("a", 1).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn dead_letters_and_receipts() {
        let t = transport(8);
        let mut rx = t.subscribe_receipts(4).await.unwrap();
        let r = Receipt {
            tenant: "x".into(),
            rows: 3,
            committed: 1,
            latency: vec![],
        };
        t.publish_receipt(&r).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), r);
        t.dead_letter(DeadLetter {
            body: b"junk",
            refusal: &Refusal::new(DeadLetterKind::Decode, "bad"),
            group: "a",
        })
        .await
        .unwrap();
        let Transport::InProcess(ip) = &t else {
            unreachable!()
        };
        let dl = ip.dead_letters();
        assert_eq!(dl.len(), 1);
        assert_eq!(dl[0].reason, "bad");
        assert_eq!(dl[0].kind, DeadLetterKind::Decode);
    }
}
