//! Consumers that outlive their connection: each follows its [`Link`] and subscribes again
//! on every new session, and when the broker cancels it (queue deleted, node down for a
//! quorum queue's leader) or its channel fails.
//!
//! A consumer ends only when it was cancelled by its owner or its transport was closed, so
//! a pool never stops because the broker went away for a while. Deliveries of a lost
//! channel cannot be settled any more (their acks fail and are counted by the caller); the
//! broker redelivers them, flagged `redelivered`, and consumers deduplicate.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;

use super::link::{Link, MAX_BACKOFF};
use crate::internal_events::ConsumerResubscribed;
use crate::receipt::Receipt;
use crate::tenancy::Publisher;
use crate::transport::{Acker, Delivery};

/// Wait before subscribing again after the broker refused or cancelled a consumer.
const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(500);

/// How many consumers a transport has, and how many are subscribed now.
#[derive(Debug, Default)]
pub(super) struct ConsumerCounts {
    total: AtomicUsize,
    attached: AtomicUsize,
}

impl ConsumerCounts {
    /// (consumers, subscribed).
    pub(super) fn get(&self) -> (usize, usize) {
        (
            self.total.load(Ordering::Relaxed),
            self.attached.load(Ordering::Relaxed),
        )
    }
}

/// Consumer of one queue on one broker.
#[derive(Debug)]
pub(in crate::transport) struct AmqpConsumer {
    link: Link,
    queue: String,
    prefetch: u16,
    current: Option<Subscription>,
    cancelled: bool,
    counts: Arc<ConsumerCounts>,
    /// Broker users whose messages are Sluice's own ([`Publisher::Sluice`]).
    trusted: Arc<HashSet<String>>,
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        self.set_current(None);
        self.counts.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Subscription {
    generation: u64,
    channel: Channel,
    consumer: lapin::Consumer,
}

impl AmqpConsumer {
    /// Subscribes once now, so a missing queue is an error at start rather than a retry.
    pub(super) async fn start(
        link: Link,
        queue: &str,
        prefetch: u16,
        counts: Arc<ConsumerCounts>,
        trusted: Arc<HashSet<String>>,
    ) -> Result<Self, lapin::Error> {
        counts.total.fetch_add(1, Ordering::Relaxed);
        let mut c = Self {
            link,
            queue: queue.to_owned(),
            prefetch,
            current: None,
            cancelled: false,
            counts,
            trusted,
        };
        if let Some(session) = c.link.current() {
            let sub = subscribe(&session.conn, session.generation, &c.queue, prefetch).await?;
            c.set_current(Some(sub));
        }
        Ok(c)
    }

    /// Replaces the subscription, keeping the attached count.
    fn set_current(&mut self, sub: Option<Subscription>) {
        let attached = &self.counts.attached;
        match (self.current.is_some(), sub.is_some()) {
            (false, true) => {
                attached.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                attached.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.current = sub;
    }

    pub(in crate::transport) async fn next(&mut self, queue: Arc<str>) -> Option<Delivery> {
        loop {
            if self.cancelled && self.current.is_none() {
                return None;
            }
            let Some(sub) = &mut self.current else {
                let session = self.link.session().await?;
                if self.cancelled {
                    return None;
                }
                match subscribe(
                    &session.conn,
                    session.generation,
                    &self.queue,
                    self.prefetch,
                )
                .await
                {
                    Ok(s) => {
                        ConsumerResubscribed {
                            queue: &queue,
                            broker: self.link.broker(),
                        }
                        .emit();
                        self.set_current(Some(s));
                    }
                    Err(e) => {
                        tracing::warn!(%queue, broker = self.link.broker(), error = %e, "cannot subscribe; retrying");
                        tokio::time::sleep(RESUBSCRIBE_BACKOFF.min(MAX_BACKOFF)).await;
                    }
                }
                continue;
            };
            let generation = sub.generation;
            let next = tokio::select! {
                d = sub.consumer.next() => d,
                () = self.link.lost(generation) => Some(Err(lapin::ErrorKind::InvalidConnectionState(
                    lapin::ConnectionState::Error,
                ).into())),
            };
            match next {
                Some(Ok(d)) => {
                    let publisher = match d.properties.user_id() {
                        Some(u) if self.trusted.contains(u.as_str()) => Publisher::Sluice,
                        Some(u) => Publisher::User(u.to_string()),
                        None => Publisher::Unknown,
                    };
                    return Some(Delivery {
                        body: Bytes::from(d.data),
                        redelivered: d.redelivered,
                        queue,
                        publisher,
                        acker: Acker::Amqp(d.acker),
                    });
                }
                Some(Err(e)) => {
                    self.set_current(None);
                    if self.cancelled {
                        return None;
                    }
                    tracing::warn!(%queue, broker = self.link.broker(), error = %e, "consumer lost its channel; subscribing again");
                }
                None => {
                    self.set_current(None);
                    if self.cancelled {
                        return None;
                    }
                    tracing::warn!(%queue, broker = self.link.broker(), "consumer cancelled by the broker; subscribing again");
                    tokio::time::sleep(RESUBSCRIBE_BACKOFF).await;
                }
            }
        }
    }

    pub(in crate::transport) async fn cancel(&mut self) {
        if self.cancelled {
            return;
        }
        self.cancelled = true;
        if let Some(sub) = &self.current {
            let tag = sub.consumer.tag();
            if let Err(e) = sub
                .channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::debug!(error = %e, "basic.cancel");
                self.set_current(None);
            }
        }
    }
}

async fn subscribe(
    conn: &Connection,
    generation: u64,
    queue: &str,
    prefetch: u16,
) -> Result<Subscription, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(Subscription {
        generation,
        channel,
        consumer,
    })
}

/// Forwards commit receipts from `link` into `tx` until `tx` closes or the link does: an
/// exclusive queue bound to the commits exchange, declared again on every session.
/// Receipts published while no session is up are missed (they are transient by design).
pub(super) async fn forward_receipts(link: Link, exchange: String, tx: mpsc::Sender<Receipt>) {
    loop {
        let Some(session) = link.session().await else {
            return;
        };
        let consumer = async {
            let ch = session.conn.create_channel().await?;
            let q = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            ch.queue_bind(
                q.name().clone(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let consumer = ch
                .basic_consume(
                    q.name().clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((ch, consumer))
        };
        let (_ch, mut consumer) = match consumer.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(broker = link.broker(), error = %e, "cannot subscribe to receipts; retrying");
                tokio::time::sleep(RESUBSCRIBE_BACKOFF).await;
                continue;
            }
        };
        loop {
            let d = tokio::select! {
                d = consumer.next() => d,
                () = link.lost(session.generation) => None,
                () = tx.closed() => return,
            };
            match d {
                Some(Ok(d)) => match Receipt::decode(&d.data) {
                    Ok(r) => {
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed receipt"),
                },
                Some(Err(_)) | None => break,
            }
        }
        tracing::info!(
            broker = link.broker(),
            "receipt subscription lost; subscribing again"
        );
    }
}
