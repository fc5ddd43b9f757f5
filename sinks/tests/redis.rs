//! `LatestStore::Redis` against a real Redis (`REDIS_URL`, default redis://127.0.0.1:6379).
//! Each test uses its own key prefix and deletes its keys afterwards.
#![cfg(feature = "broker-tests")]

use std::time::Duration;

use sluice_sinks::latest::{DeviceLatest, Latest, LatestStore, RedisLatest};
use sluice_sinks::{StagedBatch, readings_rows};

/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000_000_000;

fn batch(tenant: &str, readings: &[(&str, &str, i64, f64)]) -> StagedBatch {
    StagedBatch {
        tenant: tenant.to_owned(),
        batch_id: uuid::Uuid::now_v7(),
        maybe_duplicate: false,
        rows: readings_rows(readings.iter().copied()),
    }
}

fn latest(metric: &str, ts_ns: i64, value: f64) -> Latest {
    Latest {
        metric: metric.to_owned(),
        ts_ns,
        value,
    }
}

/// Connects with a fresh prefix, retrying with backoff while Redis starts.
async fn store(test: &str) -> (LatestStore, redis::aio::ConnectionManager, String) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("sluice-test-{test}-{}", uuid::Uuid::new_v4().simple());
    let mut delay = Duration::from_millis(50);
    for attempt in 0.. {
        match RedisLatest::connect(&url, prefix.clone()).await {
            Ok(redis) => {
                let client = redis::Client::open(url.as_str()).expect("url");
                let raw = redis::aio::ConnectionManager::new(client)
                    .await
                    .expect("conn");
                return (LatestStore::Redis(redis), raw, prefix);
            }
            Err(e) if attempt < 8 => {
                eprintln!("waiting for Redis at {url}: {e}");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => panic!("Redis at {url} unavailable: {e}"),
        }
    }
    unreachable!()
}

async fn cleanup(conn: &mut redis::aio::ConnectionManager, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(conn)
        .await
        .expect("keys");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(conn)
            .await
            .expect("del");
    }
}

#[tokio::test]
async fn redis_keeps_the_newest_reading() {
    let (store, mut conn, prefix) = store("newest").await;
    store
        .update(&[
            batch(
                "acme",
                &[
                    ("d1", "kwh", T0 + 5, 5.0),
                    ("d1", "kwh", T0 + 9, 9.0),
                    ("d1", "volt", T0, 230.1),
                    ("d2", "kwh", T0, 1.0),
                ],
            ),
            batch("acme", &[("d1", "kwh", T0 + 7, 7.0)]),
            batch("other", &[("d1", "kwh", T0 + 100, 100.0)]),
        ])
        .await
        .expect("update");

    assert_eq!(
        store.get("acme", "d1").await.expect("get"),
        vec![latest("kwh", T0 + 9, 9.0), latest("volt", T0, 230.1)]
    );
    // The documented layout.
    let raw: String = redis::cmd("HGET")
        .arg(format!("{prefix}:latest:acme:d1"))
        .arg("kwh")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(raw, format!("{:020}|9.0", T0 + 9));

    // A newer reading in a later call replaces the stored one.
    store
        .update(&[batch("acme", &[("d1", "kwh", T0 + 10, 10.0)])])
        .await
        .expect("update");
    assert_eq!(
        store.get("acme", "d1").await.expect("get")[0],
        latest("kwh", T0 + 10, 10.0)
    );

    assert_eq!(
        store.get_all_for_tenant("acme").await.expect("all"),
        vec![
            DeviceLatest {
                device: "d1".into(),
                readings: vec![latest("kwh", T0 + 10, 10.0), latest("volt", T0, 230.1)],
            },
            DeviceLatest {
                device: "d2".into(),
                readings: vec![latest("kwh", T0, 1.0)],
            },
        ]
    );
    assert_eq!(
        store.get_all_for_tenant("other").await.expect("all").len(),
        1
    );
    assert!(
        store
            .get_all_for_tenant("nobody")
            .await
            .expect("all")
            .is_empty()
    );
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn older_readings_do_not_overwrite() {
    let (store, mut conn, prefix) = store("older").await;
    store
        .update(&[batch("acme", &[("d1", "kwh", T0 + 1_000, 2.0)])])
        .await
        .expect("update");
    // Late data and a redelivered older batch: older timestamps, including one that differs
    // only in the last digit, and an equal timestamp with another value.
    store
        .update(&[
            batch("acme", &[("d1", "kwh", T0, 1.0)]),
            batch("acme", &[("d1", "kwh", T0 + 999, 1.5)]),
        ])
        .await
        .expect("update");
    store
        .update(&[batch("acme", &[("d1", "kwh", T0 + 1_000, 3.0)])])
        .await
        .expect("update");
    assert_eq!(
        store.get("acme", "d1").await.expect("get"),
        vec![latest("kwh", T0 + 1_000, 2.0)]
    );

    // Timestamps of different digit counts still order correctly (zero padding).
    store
        .update(&[batch("acme", &[("d9", "m", 9_999_999_999, 1.0)])])
        .await
        .expect("update");
    store
        .update(&[batch("acme", &[("d9", "m", 999_999_999, 0.0)])])
        .await
        .expect("update");
    assert_eq!(
        store.get("acme", "d9").await.expect("get"),
        vec![latest("m", 9_999_999_999, 1.0)]
    );
    cleanup(&mut conn, &prefix).await;
}

#[tokio::test]
async fn survives_a_flushed_script_cache() {
    let (store, mut conn, prefix) = store("noscript").await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    store
        .update(&[batch("acme", &[("d1", "kwh", T0, 4.0)])])
        .await
        .expect("update reloads the script");
    assert_eq!(
        store.get("acme", "d1").await.expect("get"),
        vec![latest("kwh", T0, 4.0)]
    );
    cleanup(&mut conn, &prefix).await;
}
