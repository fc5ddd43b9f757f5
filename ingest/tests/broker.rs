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
