//! `LatestStore::Redis` against a real Redis.

use std::time::Duration;

use sluice_sinks::StagedBatch;
use sluice_sinks::latest::{DeviceLatest, Latest, LatestStore, RedisLatest};
use sluice_testkit::Namespace;
use sluice_testkit::env::redis_url;

/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000_000_000;

fn batch(tenant: &str, readings: &[(&str, &str, i64, f64)]) -> StagedBatch {
    StagedBatch::from_readings(tenant, readings.iter().copied())
}

fn latest(metric: &str, ts_ns: i64, value: f64) -> Latest {
    Latest {
        metric: metric.to_owned(),
        ts_ns,
        value,
    }
}

/// Connects with `ns` as the key prefix, retrying with backoff while Redis starts.
async fn store(ns: &Namespace) -> (LatestStore, redis::aio::ConnectionManager) {
    let url = redis_url();
    let mut delay = Duration::from_millis(50);
    for attempt in 0.. {
        match RedisLatest::connect(&url, ns.name()).await {
            Ok(redis) => {
                let client = redis::Client::open(url.as_str()).expect("url");
                let raw = redis::aio::ConnectionManager::new(client)
                    .await
                    .expect("conn");
                return (LatestStore::Redis(redis), raw);
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

#[tokio::test]
async fn redis_keeps_the_newest_reading() {
    let ns = Namespace::new("sluice-test-newest").in_redis();
    ns.guard(async {
        let (store, mut conn) = store(&ns).await;
        let prefix = ns.name();
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
    })
    .await;
}

#[tokio::test]
async fn older_readings_do_not_overwrite() {
    let ns = Namespace::new("sluice-test-older").in_redis();
    ns.guard(async {
        let (store, _conn) = store(&ns).await;
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
    })
    .await;
}

#[tokio::test]
async fn survives_a_flushed_script_cache() {
    let ns = Namespace::new("sluice-test-noscript").in_redis();
    ns.guard(async {
        let (store, mut conn) = store(&ns).await;
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
    })
    .await;
}

#[tokio::test]
async fn redis_finds_by_device_and_metric_patterns_in_pages() {
    use sluice_sinks::latest::{LatestFilter, Pattern};
    let ns = Namespace::new("sluice-test-find").in_redis();
    ns.guard(async {
        let (store, _) = store(&ns).await;
        store
            .update(&[
                batch(
                    "acme",
                    &[
                        ("pump-1", "temp", T0, 1.0),
                        ("pump-1", "rpm", T0, 2.0),
                        ("pump-2", "temp", T0, 3.0),
                        ("pump-10", "rpm", T0, 4.0),
                        ("valve[1]", "temp", T0, 5.0),
                        ("valve1", "temp", T0, 6.0),
                    ],
                ),
                // A tenant whose id extends acme's must not leak into acme's scan.
                batch("acme2", &[("pump-1", "temp", T0, 9.0)]),
            ])
            .await
            .expect("update");
        let names = |filter: LatestFilter| {
            let store = store.clone();
            async move {
                let page = store.find("acme", &filter).await.expect("find");
                let names: Vec<String> = page
                    .devices
                    .iter()
                    .map(|d| {
                        let m: Vec<&str> = d.readings.iter().map(|r| r.metric.as_str()).collect();
                        format!("{}:{}", d.device, m.join(","))
                    })
                    .collect();
                (names, page.more)
            }
        };
        let (got, more) = names(LatestFilter {
            device: Some(Pattern::new("pump-?")),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(got, ["pump-1:rpm,temp", "pump-2:temp"]);
        assert!(!more);
        // `[1]` is literal, as in memory: not a Redis character class.
        let (got, _) = names(LatestFilter {
            device: Some(Pattern::new("valve[1]")),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(got, ["valve[1]:temp"]);
        let (got, _) = names(LatestFilter {
            metric: Some(Pattern::new("rpm")),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(got, ["pump-1:rpm", "pump-10:rpm"]);
        let (got, more) = names(LatestFilter {
            limit: 3,
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(got, ["pump-1:rpm,temp", "pump-10:rpm", "pump-2:temp"]);
        assert!(more);
        let (got, more) = names(LatestFilter {
            limit: 3,
            after: Some("pump-2".into()),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(got, ["valve1:temp", "valve[1]:temp"]);
        assert!(!more);
    })
    .await;
}

#[tokio::test]
async fn a_tenant_at_its_series_cap_adds_no_series_and_others_are_untouched() {
    let ns = Namespace::new("sluice-test-series-cap").in_redis();
    ns.guard(async {
        let (store, _conn) = store(&ns).await;
        let store = store.with_max_series_per_tenant(3);
        let refused = store
            .update(&[batch(
                "acme",
                &[
                    ("d1", "a", T0, 1.0),
                    ("d1", "b", T0, 2.0),
                    ("d2", "a", T0, 3.0),
                ],
            )])
            .await
            .expect("update");
        assert!(refused.series.is_empty(), "{refused:?}");
        // At the cap: a new series is refused, a known one still moves forward.
        let refused = store
            .update(&[
                batch(
                    "acme",
                    &[
                        ("d1", "a", T0 + 1, 10.0),
                        ("d3", "a", T0, 4.0),
                        ("d1", "c", T0, 5.0),
                    ],
                ),
                batch("globex", &[("d1", "a", T0, 6.0)]),
            ])
            .await
            .expect("update");
        assert_eq!(
            refused.series.into_iter().collect::<Vec<_>>(),
            [("acme".to_owned(), 2)]
        );
        assert_eq!(
            store.get("acme", "d1").await.unwrap(),
            vec![latest("a", T0 + 1, 10.0), latest("b", T0, 2.0)]
        );
        assert!(store.get("acme", "d3").await.unwrap().is_empty());
        assert_eq!(
            store.get("globex", "d1").await.unwrap(),
            vec![latest("a", T0, 6.0)]
        );
    })
    .await;
}
