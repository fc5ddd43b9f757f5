//! The AMQP transport against a real RabbitMQ (`AMQP_ADDR`, default
//! `amqp://127.0.0.1:5672/%2f`; `scripts/services.sh` starts one): publishes confirmed by
//! the broker, deliveries settled by acks, dead letters with their `x-sluice-*` headers,
//! unroutable and nacked publishes reported as errors, a consumer group on every partition,
//! commit receipts. Each test works in a namespace of its own (`sluice_testkit::Namespace`)
//! and deletes it at the end, pass or fail. Nothing here restarts the broker.
//!
//! Run with `cargo test -p sluice-binding --features broker-tests`.
#![cfg(feature = "broker-tests")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use sluice_binding::codec::CONTENT_TYPE;
use sluice_binding::receipt::Receipt;
use sluice_binding::transport::{DeadLetter, Outgoing, PublishError, Transport};
use sluice_binding::{DeadLetterKind, Refusal, Topology};
use sluice_testkit::{Namespace, amqp};
use uuid::Uuid;

const GROUP: &str = "storage";

async fn connect(ns: &Namespace) -> Transport {
    Transport::Amqp(amqp::transport(&ns.topology(), "sluice-binding-broker-test").await)
}

fn outgoing(partition: u32, body: &[u8]) -> Outgoing<'_> {
    Outgoing {
        partition,
        body,
        batch_id: Uuid::now_v7(),
        producer: "binding-test",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_gets_every_partition_and_acks_settle_deliveries() {
    let ns = Namespace::new("bt").on_broker(4, &[GROUP]);
    ns.guard(async {
        let t = connect(&ns).await;
        t.declare(&[GROUP]).await.unwrap();
        let topology = ns.topology();
        let bodies: Vec<Vec<u8>> = (0..4).map(|p| format!("batch-{p}").into_bytes()).collect();
        for (p, body) in bodies.iter().enumerate() {
            // Returns once the broker confirmed it.
            t.publish(outgoing(p as u32, body)).await.unwrap();
        }
        let backlog = t.backlog(GROUP).await.unwrap();
        let want: Vec<(String, u64)> = (0..4)
            .map(|p| (topology.partition_queue(GROUP, p), 1))
            .collect();
        assert_eq!(backlog, want, "one batch in each partition's queue");

        let mut consumers = t.consume_group(GROUP, 4).await.unwrap();
        assert_eq!(consumers.len(), 4);
        for (p, c) in consumers.iter_mut().enumerate() {
            let queue = topology.partition_queue(GROUP, p as u32);
            assert_eq!(&**c.queue(), queue);
            let d = tokio::time::timeout(Duration::from_secs(10), c.next())
                .await
                .expect("a delivery")
                .unwrap();
            assert_eq!(d.body, bodies[p], "partition {p} holds its own batch");
            assert!(!d.redelivered);
            assert_eq!(&*d.queue, queue);
            if p == 0 {
                // Requeued: it comes back, marked as possibly seen before.
                d.acker.requeue().await.unwrap();
                let again = tokio::time::timeout(Duration::from_secs(10), c.next())
                    .await
                    .expect("the requeued delivery")
                    .unwrap();
                assert_eq!(again.body, bodies[0]);
                assert!(again.redelivered);
                again.acker.ack().await.unwrap();
            } else {
                d.acker.ack().await.unwrap();
            }
        }
        for c in &mut consumers {
            c.cancel().await;
        }
        t.close().await;
        // Acked, not merely unsettled: with every connection closed nothing came back.
        let (conn, _) = amqp::connect().await;
        for p in 0..4 {
            let queue = topology.partition_queue(GROUP, p);
            assert_eq!(amqp::ready(&conn, &queue).await, Some(0), "{queue}");
        }
        let _ = conn.close(200, "done".into()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_batch_carries_its_id_producer_and_format() {
    let ns = Namespace::new("bt").on_broker(2, &[GROUP]);
    ns.guard(async {
        let t = connect(&ns).await;
        t.declare(&[GROUP]).await.unwrap();
        let msg = outgoing(1, b"batch");
        t.publish(msg).await.unwrap();
        let (conn, ch) = amqp::connect().await;
        let queue = ns.topology().partition_queue(GROUP, 1);
        let m = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the batch is in partition 1's queue");
        let props = &m.delivery.properties;
        assert_eq!(m.delivery.data, b"batch");
        let id = msg.batch_id.hyphenated().to_string();
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some(id.as_str())
        );
        assert_eq!(
            props.app_id().as_ref().map(|s| s.as_str()),
            Some("binding-test")
        );
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some(CONTENT_TYPE)
        );
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        let headers = props.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get("sluice-version"),
            Some(&AMQPValue::LongInt(1))
        );
        let _ = conn.close(200, "done".into()).await;
        t.close().await;
    })
    .await;
}

/// Dead-letters `n` bodies of `size` bytes, each starting with its index.
async fn dead_letter_numbered(t: &Transport, n: usize, size: usize) {
    for i in 0..n {
        let mut body = format!("{i:08}").into_bytes();
        body.resize(size, b'.');
        t.dead_letter(DeadLetter {
            body: &body,
            refusal: &Refusal::new(DeadLetterKind::Decode, "malformed batch"),
            group: GROUP,
        })
        .await
        .unwrap();
    }
}

/// The indices (first 8 bytes) of every message in `queue`, consumed.
async fn drain_numbered(ch: &lapin::Channel, queue: &str) -> Vec<usize> {
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let head = std::str::from_utf8(&m.delivery.data[..8]).unwrap();
        got.push(head.parse().unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_queue_is_bounded_and_keeps_the_newest() {
    let ns = Namespace::new("bt").on_broker(1, &[GROUP]);
    ns.guard(async {
        let topology = Topology {
            dead_letter_max_bytes: 10_000,
            ..ns.topology()
        };
        let t = Transport::Amqp(amqp::transport(&topology, "sluice-binding-broker-test").await);
        t.declare(&[GROUP]).await.unwrap();
        // 50 dead letters of 1 000 bytes into a 10 000-byte bound.
        dead_letter_numbered(&t, 50, 1_000).await;
        let (conn, ch) = amqp::connect().await;
        let got = drain_numbered(&ch, &topology.dead_letter_queue()).await;
        let want: Vec<usize> = (40..50).collect();
        assert_eq!(
            got, want,
            "the oldest were dropped, the newest 10 kept in order"
        );
        let _ = conn.close(200, "done".into()).await;
        t.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_declared_without_a_bound_is_kept_and_still_used() {
    let ns = Namespace::new("bt").on_broker(1, &[GROUP]);
    ns.guard(async {
        let topology = ns.topology();
        // As a release before the bound declared it: quorum, no length arguments.
        let (conn, ch) = amqp::connect().await;
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            topology.dead_letter_queue().as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
        let bounded = Topology {
            dead_letter_max_bytes: 10_000,
            ..topology.clone()
        };
        // Connecting and declaring succeed (the refusal of the bounded declaration is
        // caught), and run again on every new connection.
        let t = Transport::Amqp(amqp::transport(&bounded, "sluice-binding-broker-test").await);
        t.declare(&[GROUP]).await.unwrap();
        t.declare(&[GROUP]).await.unwrap();
        dead_letter_numbered(&t, 30, 1_000).await;
        let got = drain_numbered(&ch, &topology.dead_letter_queue()).await;
        let want: Vec<usize> = (0..30).collect();
        assert_eq!(
            got, want,
            "the existing queue, unbounded, got every dead letter"
        );
        // The partitions were declared after the refusal: publishing to them works.
        t.publish(outgoing(0, b"after")).await.unwrap();
        assert_eq!(
            amqp::ready(&conn, &topology.partition_queue(GROUP, 0)).await,
            Some(1)
        );
        let _ = conn.close(200, "done".into()).await;
        t.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_reach_the_dead_letter_queue_with_their_headers() {
    let ns = Namespace::new("bt").on_broker(2, &[GROUP]);
    ns.guard(async {
        let t = connect(&ns).await;
        t.declare(&[GROUP]).await.unwrap();
        let refused = [
            (
                b"not msgpack".to_vec(),
                DeadLetterKind::Decode,
                "malformed batch",
            ),
            (
                b"\x81\xa1v\x02".to_vec(),
                DeadLetterKind::UnsupportedVersion,
                "version 2",
            ),
        ];
        for (body, kind, reason) in &refused {
            t.dead_letter(DeadLetter {
                body,
                refusal: &Refusal::new(*kind, *reason),
                group: GROUP,
            })
            .await
            .unwrap();
        }
        let (conn, ch) = amqp::connect().await;
        let dlq = ns.topology().dead_letter_queue();
        let mut got = BTreeSet::new();
        for _ in 0..refused.len() {
            let m = ch
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
                .expect("a dead letter");
            let p = &m.delivery.properties;
            got.insert((
                m.delivery.data.clone(),
                amqp::header(p, "x-sluice-error"),
                amqp::header(p, "x-sluice-reason"),
                amqp::header(p, "x-sluice-group"),
            ));
        }
        let want: BTreeSet<_> = refused
            .iter()
            .map(|(b, e, r)| {
                (
                    b.clone(),
                    e.as_str().to_owned(),
                    (*r).to_owned(),
                    GROUP.to_owned(),
                )
            })
            .collect();
        assert_eq!(got, want, "the original bodies, with why and by whom");
        assert_eq!(amqp::ready(&conn, &dlq).await, Some(0));
        let _ = conn.close(200, "done".into()).await;
        t.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_and_nacked_publishes_are_errors_not_drops() {
    let ns = Namespace::new("bt").on_broker(2, &[]);
    let full = format!("{}.full", ns.name());
    ns.add_queue(full.as_str());
    ns.guard(async {
        let t = connect(&ns).await;
        // Exchanges only: no queue is bound to any partition.
        t.declare(&[]).await.unwrap();
        assert!(matches!(
            t.publish(outgoing(0, b"x")).await,
            Err(PublishError::Unroutable(0))
        ));
        assert!(matches!(
            t.publish(outgoing(7, b"x")).await,
            Err(PublishError::Unroutable(7))
        ));
        // Partition 1 routes to a queue that takes nothing: the broker nacks.
        let (conn, ch) = amqp::connect().await;
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(0));
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString("reject-publish".into()),
        );
        ch.queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap();
        ch.queue_bind(
            full.as_str().into(),
            ns.topology().telemetry_exchange().into(),
            Topology::routing_key(1).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        assert!(matches!(
            t.publish(outgoing(1, b"x")).await,
            Err(PublishError::Nacked)
        ));
        let _ = conn.close(200, "done".into()).await;
        t.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_receipts_reach_a_subscriber() {
    let ns = Namespace::new("bt").on_broker(2, &[]);
    ns.guard(async {
        let t = connect(&ns).await;
        t.declare(&[]).await.unwrap();
        let mut rx = t.subscribe_receipts(16).await.unwrap();
        let receipt = Receipt {
            tenant: "acme".into(),
            rows: 42,
            committed: 7,
            latency: vec![],
        };
        // Receipts are transient: published again until the subscription is bound.
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            t.publish_receipt(&receipt).await.unwrap();
            if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                break r;
            }
            assert!(Instant::now() < deadline, "no receipt within 10 s");
        };
        assert_eq!(got, receipt);
        t.close().await;
    })
    .await;
}
