//! The router (`sluice router`) killed mid-stream and restarted on its port: every
//! matched reading notified to a webhook at least once, nothing else. The webhook
//! receiver takes 20 ms a notification, so notifications are in flight at the kill.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use sluice_binding::codec;
use sluice_binding::model::{BatchBuilder, now_ns};
use sluice_testkit::amqp;

use crate::support::broker::*;
use crate::support::*;

#[test]
fn a_router_killed_mid_stream_loses_no_notification() {
    let w = World::new();
    let port = free_port();
    let mut first = w.router(port);
    let (hook, got) = webhook_receiver();
    let http = Http::new();
    let sub = serde_json::json!({
        "criteria": {"devices": ["k-*"]},
        "policy": {"batch_notify": {"count": 50, "duration": "200ms"}},
        "target": {"type": "webhook", "url": hook},
    });
    let (status, body) = http.post(
        &format!("http://127.0.0.1:{port}/v1/subscriptions"),
        Some("acme-key"),
        "application/json",
        sub.to_string().into_bytes(),
    );
    assert_eq!(status, 201, "{body}");

    // 40 batches of 250 readings straight to the broker, 10 a second.
    let telemetry = w.ns.topology().telemetry_exchange();
    let mut expected = std::collections::BTreeSet::new();
    let mut batches = Vec::new();
    for seq in 0..40u64 {
        let mut b = BatchBuilder::new("acme", "router-e2e", seq);
        for i in 0..250 {
            b.push(&format!("k-{}", i % 25), "m", now_ns(), f64::from(i));
        }
        let batch = b.finish(now_ns());
        expected.extend((0..250).map(|i| format!("{}:{i}", batch.id.simple())));
        batches.push(batch);
    }
    let publisher = std::thread::spawn(move || {
        rt().block_on(async move {
            let (_conn, ch) = amqp::connect().await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            for (i, b) in batches.iter().enumerate() {
                let body = codec::encode(b).unwrap();
                let key = (i as u32 % PARTITIONS).to_string();
                amqp::publish_confirmed(&ch, &telemetry, &key, &body).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    // SIGKILL once some, not all, notifications arrived.
    wait_until("first notifications", Duration::from_secs(60), || {
        !got.lock().unwrap().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill();
    let before = event_ids(&got);
    assert!(
        before.len() < expected.len(),
        "killed after {} of {} events: not mid-stream",
        before.len(),
        expected.len()
    );
    let _second = w.router(port);
    publisher.join().unwrap();
    wait_until("every event notified", Duration::from_secs(120), || {
        event_ids(&got).len() >= expected.len()
    });
    let all = event_ids(&got);
    assert_eq!(all, expected, "every event at least once, and nothing else");
}
