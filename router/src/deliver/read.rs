//! Takes jobs off one notify queue for the policy loop; an undecodable job goes to the
//! dead-letter queue rather than looping.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use lapin::BasicProperties;
use sluice_binding::transport::Consumer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Incoming;
use super::settle::Settle;
use crate::job::Job;
use crate::outbox::Outbox;

pub(super) async fn read(
    queue: usize,
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
                    share: OnceLock::new(),
                });
                if tx.send(Incoming { job, hold, queue }).await.is_err() {
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
