//! Probes as a direct publisher on the broker, with mallory's broker user: batches and
//! derived events that claim acme (hole 3), a batch spread over a month (hole 6), a
//! tenant name that walks out of the table (`../acme`), the broker's own checks on
//! `user_id` and permissions, and hostile bytes that must be dead-lettered, not crash a
//! consumer.

use std::time::Duration;

use serde_json::json;
use sluice_binding::Topology;
use sluice_binding::codec;
use sluice_binding::event::{DerivedEvent, Event, EventKind, FORMAT_VERSION};
use sluice_binding::model::{BatchBuilder, now_ns};

use crate::Suite;
use crate::deployment::*;

const DAY_NS: i64 = 86_400_000_000_000;

pub(crate) async fn probes(d: &Deployment, s: &mut Suite) {
    s.probe(
        "3",
        "a batch claiming acme under mallory's user_id is dead-lettered by every consumer",
        spoofed_batch(d, true),
    )
    .await;
    s.probe(
        "3",
        "a batch claiming acme without user_id is dead-lettered by every consumer",
        spoofed_batch(d, false),
    )
    .await;
    s.probe(
        "3",
        "mallory's user cannot set Sluice's own user as user_id",
        borrowed_user_id(d),
    )
    .await;
    s.probe(
        "3",
        "mallory's user cannot publish into a partition queue or the notify exchange",
        outside_permissions(d),
    )
    .await;
    s.probe(
        "3",
        "a derived event claiming acme is dead-lettered and notifies nothing",
        spoofed_event(d),
    )
    .await;
    s.probe(
        "5",
        "mallory's direct publisher at 10x its quota: its ingress queue nacks the excess, \
         what the broker confirmed is forwarded at the quota; acme gets 202 throughout",
        direct_flood(d),
    )
    .await;
    s.probe(
        "6",
        "a direct batch spread over 30 days is dead-lettered",
        month_batch(d),
    )
    .await;
    s.probe(
        "traversal",
        "a batch for tenant \"../acme\" is dead-lettered and writes nothing",
        traversal(d),
    )
    .await;
    s.probe(
        "12",
        "hostile bytes on the telemetry exchange are dead-lettered; consumers run on",
        hostile_bytes(d),
    )
    .await;
}

fn partition() -> String {
    Topology::routing_key(0)
}

/// Publishes `body` to partition 0 as mallory's user, with its own `user_id`, as a direct
/// publisher of mallory's tenant would; panics unless the broker took it.
async fn as_mallory(d: &Deployment, body: &[u8]) {
    d.publish_as_mallory(
        &d.w.ns.topology().telemetry_exchange(),
        &partition(),
        body,
        Some(d.mallory_user.name()),
    )
    .await
    .expect("mallory may write the telemetry exchange");
}

async fn spoofed_batch(d: &Deployment, with_user_id: bool) {
    let telemetry = d.w.ns.topology().telemetry_exchange();
    let mut b = BatchBuilder::new("acme", "mallory", 1);
    b.push("spoof-batch", "m", now_ns(), 1.0);
    let body = codec::encode(&b.finish(now_ns())).unwrap();
    let user = with_user_id.then(|| d.mallory_user.name().to_owned());
    d.publish_as_mallory(&telemetry, &partition(), &body, user.as_deref())
        .await
        .expect("the broker takes it (mallory may write the telemetry exchange)");
    // Mallory's own tenant through its ingress exchange is stored (the probe can see a
    // stored batch); the same batch on the telemetry exchange went around mallory's quota
    // and is refused.
    let mut own = BatchBuilder::new("mallory", "mallory", 2);
    own.push(&format!("m-direct-{with_user_id}"), "m", now_ns(), 1.0);
    let own_body = codec::encode(&own.finish(now_ns())).unwrap();
    let mut around = BatchBuilder::new("mallory", "mallory", 3);
    around.push("m-around-the-gate", "m", now_ns(), 1.0);
    let around = codec::encode(&around.finish(now_ns())).unwrap();
    if with_user_id {
        let ingress = d.w.ns.topology().ingress_exchange("mallory");
        d.publish_as_mallory(&ingress, "", &own_body, user.as_deref())
            .await
            .unwrap();
        d.mallory_accepted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        d.publish_as_mallory(&telemetry, &partition(), &around, user.as_deref())
            .await
            .unwrap();
        let dl = d
            .dead_letter(
                "of a batch around the gate",
                Duration::from_secs(30),
                |dl| dl.body == around && dl.group == "storage",
            )
            .await;
        assert_eq!(dl.kind, "forbidden", "{dl:?}");
        assert!(dl.reason.contains("ingress exchange"), "{dl:?}");
        // A batch claiming acme in mallory's own ingress queue: the gate refuses it.
        d.publish_as_mallory(&ingress, "", &body, user.as_deref())
            .await
            .unwrap();
        let dl = d
            .dead_letter("of the gate", Duration::from_secs(30), |dl| {
                dl.body == body && dl.group == "ingest-gate"
            })
            .await;
        assert_eq!(dl.kind, "forbidden", "{dl:?}");
    }
    for group in ["storage", "router"] {
        let dl = d
            .dead_letter(
                &format!("forbidden from {group}"),
                Duration::from_secs(30),
                |dl| dl.body == body && dl.group == group,
            )
            .await;
        assert_eq!(dl.kind, "forbidden", "{dl:?}");
    }
    if with_user_id {
        let sql = format!("SELECT count(*) FROM readings WHERE device = 'm-direct-{with_user_id}'");
        let stored = sluice_testkit::wait::until(Duration::from_secs(30), || async {
            (d.rows("mallory", &sql).await == 1).then_some(())
        })
        .await;
        assert!(
            stored.is_some(),
            "mallory's own direct batch was not stored"
        );
    }
    assert_eq!(
        d.rows(
            "acme",
            "SELECT count(*) FROM readings WHERE device LIKE 'spoof-%'"
        )
        .await,
        0
    );
}

async fn borrowed_user_id(d: &Deployment) {
    let mut b = BatchBuilder::new("acme", "mallory", 3);
    b.push("spoof-guest", "m", now_ns(), 1.0);
    let body = codec::encode(&b.finish(now_ns())).unwrap();
    let sluice_user = sluice_testkit::amqp::user();
    let sent = d
        .publish_as_mallory(
            &d.w.ns.topology().telemetry_exchange(),
            &partition(),
            &body,
            Some(&sluice_user),
        )
        .await;
    assert!(
        sent.is_err(),
        "the broker took user_id {sluice_user} from mallory"
    );
}

async fn outside_permissions(d: &Deployment) {
    let mut b = BatchBuilder::new("mallory", "mallory", 4);
    b.push("m-perm", "m", now_ns(), 1.0);
    let body = codec::encode(&b.finish(now_ns())).unwrap();
    let t = d.w.ns.topology();
    let user = d.mallory_user.name().to_owned();
    for (exchange, key) in [
        (String::new(), t.partition_queue("storage", 0)),
        (t.notify_exchange(), "0".to_owned()),
        (t.dead_letter_exchange(), String::new()),
    ] {
        let sent = d
            .publish_as_mallory(&exchange, &key, &body, Some(&user))
            .await;
        assert!(sent.is_err(), "mallory published to {exchange:?}/{key}");
    }
}

async fn spoofed_event(d: &Deployment) {
    let (status, body) = d
        .subscribe(
            ACME,
            json!({"criteria": {"kinds": ["fault"]},
                   "target": {"type": "live"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let event = DerivedEvent {
        v: FORMAT_VERSION,
        tenant: "acme".to_owned(),
        event: Event {
            id: format!("spoof-{}", now_ns()),
            kind: EventKind::Fault,
            device: "spoof-event".to_owned(),
            metric: "m".to_owned(),
            t: now_ns(),
            value: Some(1.0),
            detail: Some("stuck".to_owned()),
        },
    };
    let bytes = event.encode();
    d.publish_as_mallory(
        &d.w.ns.topology().events_exchange(),
        &event.routing_key(),
        &bytes,
        Some(d.mallory_user.name()),
    )
    .await
    .expect("mallory may write the events exchange");
    let dl = d
        .dead_letter("of the spoofed event", Duration::from_secs(30), |dl| {
            dl.body == bytes
        })
        .await;
    assert_eq!(dl.kind, "forbidden", "{dl:?}");
    let id = body["id"].as_str().unwrap();
    d.router_call(
        reqwest::Method::DELETE,
        ACME,
        &format!("/v1/subscriptions/{id}"),
    )
    .await;
}

async fn direct_flood(d: &Deployment) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    const PER_BATCH: usize = 400;
    // Ten times the quota for 3 s: 100 batches of 400 readings a second.
    let (batches, every) = (300u64, Duration::from_millis(10));
    let conn = Connection::connect(&d.mallory_user.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let ingress = d.w.ns.topology().ingress_exchange("mallory");
    let started = std::time::Instant::now();
    let mut confirms = Vec::new();
    let mut tick = tokio::time::interval(every);
    for seq in 0..batches {
        tick.tick().await;
        let mut b = BatchBuilder::new("mallory", "mallory-flood", seq);
        for i in 0..PER_BATCH {
            b.push(&format!("m-dflood-{}", i % 20), "m", now_ns(), i as f64);
        }
        let body = codec::encode(&b.finish(now_ns())).unwrap();
        let confirm = ch
            .basic_publish(
                ingress.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_user_id(d.mallory_user.name().into()),
            )
            .await
            .unwrap();
        confirms.push(confirm);
        if seq % 25 == 0 {
            d.acme_sends(&format!("acme-during-dflood-{seq}"), 10).await;
        }
    }
    let (mut acked, mut nacked) = (0u64, 0u64);
    for c in confirms {
        if c.await.unwrap().is_ack() {
            acked += 1;
        } else {
            nacked += 1;
        }
    }
    let published = started.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    let readings = acked * PER_BATCH as u64;
    d.mallory_accepted
        .fetch_add(readings, std::sync::atomic::Ordering::SeqCst);
    assert!(
        nacked > 0,
        "the broker confirmed all {batches} batches of the flood"
    );
    // The partitions saw at most a second's burst plus the quota's rate: what is stored
    // by now was forwarded by now.
    let stored = d
        .rows(
            "mallory",
            "SELECT count(*) FROM readings WHERE device LIKE 'm-dflood-%'",
        )
        .await;
    let bound = MALLORY_QUOTA as f64 * (1.0 + started.elapsed().as_secs_f64());
    assert!(
        stored as f64 <= bound,
        "{stored} readings stored {published:.1} s into a flood held to {MALLORY_QUOTA}/s"
    );
    // Everything confirmed arrives (the final probe counts it exactly); acme's readings
    // sent during the flood are stored.
    let sql = "SELECT count(*) FROM readings WHERE device LIKE 'm-dflood-%'";
    let all = sluice_testkit::wait::until(Duration::from_secs(60), || async {
        (d.rows("mallory", sql).await >= readings).then_some(())
    })
    .await;
    assert!(
        all.is_some(),
        "mallory's confirmed flood was not all stored"
    );
    d.acme_stored("acme-during-dflood-0", 10, Duration::from_secs(30))
        .await;
}

async fn month_batch(d: &Deployment) {
    let mut b = BatchBuilder::new("mallory", "mallory", 5);
    let now = now_ns();
    for day in 0..30 {
        b.push("m-month", "m", now - day * DAY_NS, day as f64);
    }
    let body = codec::encode(&b.finish(now)).unwrap();
    as_mallory(d, &body).await;
    let dl = d
        .dead_letter("of the month batch", Duration::from_secs(30), |dl| {
            dl.body == body && dl.group == "storage"
        })
        .await;
    assert_eq!(dl.kind, "invalid", "{dl:?}");
}

async fn traversal(d: &Deployment) {
    for (i, tenant) in ["../acme", "acme/../mallory", "tenant=acme", "..", "acme\0"]
        .into_iter()
        .enumerate()
    {
        let mut b = BatchBuilder::new(tenant, "mallory", 10 + i as u64);
        b.push("spoof-traversal", "m", now_ns(), 1.0);
        let body = codec::encode(&b.finish(now_ns())).unwrap();
        as_mallory(d, &body).await;
        d.dead_letter(
            &format!("of tenant {tenant:?}"),
            Duration::from_secs(30),
            |dl| dl.body == body && dl.group == "storage",
        )
        .await;
    }
    // Nothing beside the table's own entries appeared anywhere under or next to it.
    let data = d.data();
    for dir in [data.clone(), data.parent().unwrap().to_owned()] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains("acme/") && name != ".." && !name.contains("traversal"),
                "{}: {name}",
                dir.display()
            );
        }
    }
    let tenants: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tenant="))
        .collect();
    for t in &tenants {
        assert!(
            t == "tenant=acme" || t == "tenant=mallory",
            "a partition {t} appeared"
        );
    }
}

async fn hostile_bytes(d: &Deployment) {
    let mut valid = BatchBuilder::new("mallory", "mallory", 20);
    valid.push("m-hostile", "m", now_ns(), 1.0);
    let valid = codec::encode(&valid.finish(now_ns())).unwrap();
    let bodies: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff, 0xff, 0xff],
        valid[..valid.len() / 2].to_vec(),
        // An array claiming 4 294 967 295 elements.
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        // A map claiming as many entries.
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        // 100 000 nested one-element arrays.
        vec![0x91; 100_000],
        // A string claiming 4 GiB.
        vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
    ];
    for body in &bodies {
        as_mallory(d, body).await;
    }
    for (i, body) in bodies.iter().enumerate() {
        for group in ["storage", "router"] {
            d.dead_letter(
                &format!("of hostile body {i} from {group}"),
                Duration::from_secs(30),
                |dl| &dl.body == body && dl.group == group,
            )
            .await;
        }
    }
    d.all_running();
    d.acme_sends("acme-after-hostile", 1).await;
    d.acme_stored("acme-after-hostile", 1, Duration::from_secs(30))
        .await;
}
