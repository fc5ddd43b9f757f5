//! Ingest against a real RabbitMQ (`AMQP_ADDR`, default `amqp://127.0.0.1:5672/%2f`;
//! `scripts/services.sh` starts one). Each test works in a namespace of its own
//! (`test-<id>`, `sluice_testkit::Namespace`) and deletes its queues and exchanges at the
//! end, pass or fail.
//!
//! Run with `cargo test -p sluice-ingest --features broker-tests`.
#![cfg(feature = "broker-tests")]

use std::time::Duration;

use serde_json::{Value, json};
use sluice_binding::codec::decode;
use sluice_binding::model::now_ns;
use sluice_binding::producer::Producer;
use sluice_binding::tenancy::Tenants;
use sluice_binding::transport::Transport;
use sluice_ingest::{AppState, IngestConfig, serve};
use sluice_testkit::{Namespace, amqp};

const KEY: &str = "broker-test-key";
const PARTITIONS: u32 = 2;

/// A namespace of the test's own; teardown deletes the storage group's queues.
fn namespace() -> Namespace {
    Namespace::new("test").on_broker(PARTITIONS, &["storage"])
}

async fn connect(ns: &Namespace) -> Transport {
    Transport::Amqp(amqp::transport(&ns.topology(), "sluice-ingest-broker-test").await)
}

/// Serves ingest on 127.0.0.1:0; returns its base URL, a stop sender and the server task.
async fn start(
    transport: &Transport,
    cfg: IngestConfig,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let tenants = Tenants::from_toml_str(&format!(
        "[[tenant]]\nid = \"broker-test\"\napi_keys = [\"{KEY}\"]\n"
    ))
    .unwrap();
    let producer = Producer::new(transport.clone(), cfg.producer.clone());
    let state = AppState::new(cfg, tenants, producer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    (url, stop, server)
}

async fn post(url: &str, body: &Value) -> (u16, Option<String>, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/telemetry"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_readings_are_in_the_partition_queues() {
    let ns = namespace();
    ns.guard(async {
        let transport = connect(&ns).await;
        transport.declare(&["storage"]).await.unwrap();
        let cfg = IngestConfig {
            batch_max_readings: 10,
            ..IngestConfig::default()
        };
        let (url, stop, server) = start(&transport, cfg).await;

        let ts = now_ns() - 1_000_000_000;
        let readings: Vec<Value> = (0..45)
            .map(|i| json!({"device": format!("dev-{}", i % 3), "metric": "temp", "ts": ts + i, "value": i as f64 / 2.0}))
            .collect();
        let (status, _, answer) = post(&url, &json!({ "readings": readings })).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer, json!({"accepted": 45}));

        // Everything was confirmed before the 202: the queues hold it now.
        let mut consumers = transport.consume_group("storage", 100).await.unwrap();
        let mut got = Vec::new();
        let mut batches = 0;
        for c in &mut consumers {
            while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), c.next()).await {
                let v = decode(&d.body).unwrap();
                assert_eq!(v.tenant, "broker-test");
                batches += 1;
                for i in 0..v.len() {
                    got.push((v.devices[v.d[i] as usize].to_owned(), v.metrics[v.m[i] as usize].to_owned(), v.t[i], v.x[i]));
                }
                d.acker.ack().await.unwrap();
            }
            c.cancel().await;
        }
        got.sort_by(|a, b| a.3.total_cmp(&b.3));
        let expected: Vec<(String, String, i64, f64)> = (0..45)
            .map(|i| (format!("dev-{}", i % 3), "temp".to_owned(), ts + i, i as f64 / 2.0))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(batches, 5, "45 readings in batches of 10");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        transport.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_queues_give_503_not_202() {
    let ns = namespace();
    ns.guard(async {
        let transport = connect(&ns).await;
        // Exchanges only: no partition queue is bound, so every batch is returned.
        transport.declare(&[]).await.unwrap();
        let (url, stop, server) = start(&transport, IngestConfig::default()).await;

        let ts = now_ns() - 1_000_000_000;
        let body =
            json!({"readings": [{"device": "d1", "metric": "temp", "ts": ts, "value": 1.0}]});
        let (status, retry_after, answer) = post(&url, &body).await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(answer["error"], "unavailable");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .starts_with("unroutable"),
            "{answer}"
        );

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        transport.close().await;
    })
    .await;
}

/// A gated tenant's direct publisher at many times its quota: the broker nacks what its
/// ingress queue cannot hold, the gate forwards the rest at the quota, every batch the
/// broker confirmed reaches the partitions once, and what is not the tenant's is
/// dead-lettered by the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_holds_a_direct_publisher_to_its_quota_and_forwards_every_confirmed_batch() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    use sluice_binding::codec::encode;
    use sluice_binding::model::BatchBuilder;
    use sluice_ingest::gate::{Gate, GateConfig};
    use std::collections::HashSet;

    const RATE: u64 = 2_000;
    const PER_BATCH: usize = 100;
    let ns = namespace();
    let topology = ns.topology();
    ns.add_queue(topology.ingress_queue("acme"));
    ns.add_exchange(topology.ingress_exchange("acme"));
    ns.guard(async {
        let gw = amqp::BrokerUser::create("gate-gw");
        let transport = connect(&ns).await;
        transport.declare(&["storage"]).await.unwrap();
        let tenants = Tenants::from_toml_str(&format!(
            "[[tenant]]\nid = \"acme\"\napi_keys = [\"{KEY}\"]\namqp_users = [\"{}\"]\n\
             quota = {{ readings_per_sec = {RATE} }}\n",
            gw.name()
        ))
        .unwrap();
        let cfg = IngestConfig::default();
        let state = AppState::new(
            cfg.clone(),
            tenants,
            Producer::new(transport.clone(), cfg.producer.clone()),
        );
        let gate_cfg = GateConfig {
            max_backlog_bytes: 20_000,
            prefetch: 8,
        };
        let gate = Gate::start(state.clone(), gate_cfg).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let gate = tokio::spawn(gate.run(async {
            let _ = stopped.await;
        }));

        // The gateway publishes 200 batches of 100 readings as fast as confirms allow: a
        // hundred times its rate.
        let conn = Connection::connect(&gw.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exchange = topology.ingress_exchange("acme");
        // Returns the confirm still to await: the test pipelines its publishes.
        async fn publish_to(
            ch: &lapin::Channel,
            exchange: &str,
            user: &str,
            body: &[u8],
        ) -> lapin::PublisherConfirm {
            ch.basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_user_id(user.into()),
            )
            .await
            .unwrap()
        }
        let started = std::time::Instant::now();
        let mut confirms = Vec::new();
        let ts = now_ns() - 1_000_000_000;
        for seq in 0..200u64 {
            let mut b = BatchBuilder::new("acme", "gw-1", seq);
            for i in 0..PER_BATCH {
                b.push("d1", "temp", ts + i as i64, seq as f64);
            }
            let batch = b.finish(now_ns());
            confirms.push((
                batch.id,
                publish_to(&ch, &exchange, gw.name(), &encode(&batch).unwrap()).await,
            ));
        }
        let mut confirmed = HashSet::new();
        let mut nacked = 0;
        for (id, c) in confirms {
            if c.await.unwrap().is_ack() {
                confirmed.insert(id);
            } else {
                nacked += 1;
            }
        }
        assert!(nacked > 0, "the ingress queue never refused a publish");
        assert!(!confirmed.is_empty());
        // Not the tenant's: a batch naming another tenant, and bytes that are no batch.
        let mut spoofed = BatchBuilder::new("globex", "gw-1", 0);
        spoofed.push("d1", "temp", ts, 1.0);
        let spoofed = spoofed.finish(now_ns());
        let (dconn, dlq) = amqp::connect().await;
        // Published once the queue has room again (a nack is a full queue).
        for body in [encode(&spoofed).unwrap(), b"not a batch".to_vec()] {
            sluice_testkit::wait::until(Duration::from_secs(30), || {
                let (ch, exchange, user, body) = (&ch, &exchange, gw.name(), body.clone());
                async move {
                    let confirm = publish_to(ch, exchange, user, &body).await;
                    confirm.await.unwrap().is_ack().then_some(())
                }
            })
            .await
            .expect("room in the ingress queue within 30 s");
        }

        // Every confirmed batch reaches the partitions, once; nothing nacked does.
        let partitions: Vec<String> = (0..PARTITIONS)
            .map(|p| topology.partition_queue("storage", p))
            .collect();
        let mut forwarded = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while forwarded.len() < confirmed.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {} confirmed batches forwarded",
                forwarded.len(),
                confirmed.len()
            );
            let mut got = false;
            for q in &partitions {
                if let Some(m) = dlq
                    .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                {
                    let view = decode(&m.delivery.data).unwrap();
                    assert_eq!(view.tenant, "acme");
                    // Forwarded as Sluice's own user, the same bytes and id.
                    assert_eq!(
                        m.delivery.properties.user_id().as_ref().map(|u| u.as_str()),
                        Some(amqp::user().as_str())
                    );
                    forwarded.push(view.id);
                    got = true;
                }
            }
            if !got {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let unique: HashSet<_> = forwarded.iter().copied().collect();
        assert_eq!(unique.len(), forwarded.len(), "a batch forwarded twice");
        assert_eq!(unique, confirmed);
        // At most a second's burst plus the rate over the time it took.
        let readings = (forwarded.len() * PER_BATCH) as f64;
        assert!(
            readings <= RATE as f64 * (1.0 + elapsed),
            "{readings} readings in {elapsed:.2} s at a quota of {RATE}/s"
        );

        // The two that were not the tenant's are dead letters of the gate.
        let dead = topology.dead_letter_queue();
        let mut kinds = Vec::new();
        sluice_testkit::wait::until(Duration::from_secs(30), || {
            let (dconn, dead) = (&dconn, dead.clone());
            async move { (amqp::ready(dconn, &dead).await >= Some(2)).then_some(()) }
        })
        .await
        .expect("two dead letters within 30 s");
        while let Some(m) = dlq
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let p = &m.delivery.properties;
            assert_eq!(amqp::header(p, "x-sluice-group"), "ingest-gate");
            kinds.push(amqp::header(p, "x-sluice-error"));
        }
        kinds.sort();
        assert_eq!(kinds, ["decode", "forbidden"]);
        // Nothing else passed: the partitions are empty.
        for q in &partitions {
            assert!(
                dlq.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                    .is_none()
            );
        }

        let _ = stop.send(());
        gate.await.unwrap();
        let _ = conn.close(200, "done".into()).await;
        let _ = dconn.close(200, "done".into()).await;
        transport.close().await;
    })
    .await;
}
