//! Probes through ingest's HTTP API: trickled bodies and idle connections (hole 4), a flood
//! at ten times the quota and a request over a second of it (hole 5), more latest-value
//! series than a tenant may keep (hole 5), a request spread over days (hole 6), key scopes
//! (hole 9), a tenant named in the body or in headers, and hostile bodies.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_binding::model::now_ns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Suite;
use crate::deployment::*;

const DAY_NS: i64 = 86_400_000_000_000;

pub(crate) async fn probes(d: &Deployment, s: &mut Suite) {
    s.probe(
        "4",
        "100 connections trickling mallory's bodies leave acme served; they get 408",
        trickled_bodies(d),
    )
    .await;
    s.probe(
        "4",
        "connections that never send headers are closed after the header timeout",
        idle_connections(d),
    )
    .await;
    s.probe(
        "5",
        "mallory at 10x its quota gets 429 with Retry-After; acme gets 202 throughout",
        flood(d),
    )
    .await;
    s.probe(
        "5",
        "a request larger than a second of mallory's quota gets 413",
        over_a_second(d),
    )
    .await;
    s.probe(
        "5",
        "mallory keeps at most its cap of latest-value series; acme's are kept",
        series_cap(d),
    )
    .await;
    s.probe("6", "a request over 9 UTC days gets 422", many_days(d))
        .await;
    s.probe(
        "9",
        "mallory's device key sends telemetry and nothing else",
        device_key(d),
    )
    .await;
    s.probe(
        "spoofed tenant",
        "a tenant in an HTTP body gets 400; tenant headers are ignored",
        tenant_in_request(d),
    )
    .await;
    s.probe(
        "12",
        "hostile HTTP bodies get 400; ingest runs on",
        hostile_bodies(d),
    )
    .await;
}

fn addr(d: &Deployment) -> String {
    d.ingest.trim_start_matches("http://").to_owned()
}

async fn trickled_bodies(d: &Deployment) {
    let mut trickling = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(addr(d)).await.unwrap();
        let head = format!(
            "POST /v1/telemetry HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {MALLORY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"rea"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        trickling.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        d.acme_sends(&format!("acme-trickle-{i}"), 10).await;
    }
    let started = Instant::now();
    for c in &mut trickling {
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(READ_TIMEOUT * 5, c.read(&mut buf))
            .await
            .expect("an answer within the body timeout")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        // Over the per-tenant share, some were answered 503 at once; the rest time out.
        assert!(
            text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.1 503"),
            "{text}"
        );
    }
    assert!(started.elapsed() < READ_TIMEOUT * 5);
}

async fn idle_connections(d: &Deployment) {
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(addr(d)).await.unwrap());
    }
    d.acme_sends("acme-idle", 1).await;
    for c in &mut idle {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(READ_TIMEOUT * 3, c.read(&mut buf)).await;
        assert!(
            r.is_ok(),
            "an idle connection stayed open past the header timeout"
        );
    }
}

async fn flood(d: &Deployment) {
    // 40 000 readings in about a second: 10x mallory's 4000/s, from 8 senders.
    let started = Instant::now();
    let senders: Vec<_> = (0..8)
        .map(|w| async move {
            let mut statuses = Vec::new();
            for i in 0..5 {
                let body = readings(&format!("m-flood-{w}-{i}"), 1000, now_ns());
                let (status, _, retry) = d.post(MALLORY, &body).await;
                if status == 202 {
                    d.mallory_accepted
                        .fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                }
                statuses.push((status, retry));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            statuses
        })
        .collect();
    let victim = async {
        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            let t = Instant::now();
            d.acme_sends(&format!("acme-flood-{i}"), 100).await;
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slowest
    };
    let (statuses, slowest) = futures::join!(futures::future::join_all(senders), victim);
    let statuses: Vec<_> = statuses.into_iter().flatten().collect();
    let limited: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(
        !limited.is_empty(),
        "no 429 for 40 000 readings in {:?}: {statuses:?}",
        started.elapsed()
    );
    assert!(
        limited.iter().all(|(_, r)| r.is_some()),
        "a 429 without Retry-After"
    );
    assert!(
        statuses.iter().all(|(s, _)| *s == 202 || *s == 429),
        "{statuses:?}"
    );
    eprintln!("flood: acme's slowest request took {slowest:?}");
}

async fn over_a_second(d: &Deployment) {
    let body = readings("m-big", MALLORY_QUOTA as usize + 1, now_ns());
    let (status, b, _) = d.post(MALLORY, &body).await;
    assert_eq!(status, 413, "{b}");
}

async fn series_cap(d: &Deployment) {
    tokio::time::sleep(Duration::from_secs(2)).await; // the quota refills
    // 300 new series in one request (mallory already holds some): past the cap of 200.
    let r: Vec<_> = (0..300)
        .map(|i| json!({"device": format!("m-series-{i}"), "metric": "m", "ts": now_ns(), "value": 1.0}))
        .collect();
    let (status, b, _) = d.post(MALLORY, &json!({ "readings": r })).await;
    assert_eq!(status, 202, "{b}");
    d.mallory_accepted
        .fetch_add(300, std::sync::atomic::Ordering::SeqCst);
    d.acme_sends("acme-series-after", 1).await;
    d.acme_stored("acme-series-after", 1, Duration::from_secs(30))
        .await;
    let sql = "SELECT count(*) FROM readings WHERE device LIKE 'm-series-%'";
    let stored = sluice_testkit::wait::until(Duration::from_secs(30), || async {
        (d.rows("mallory", sql).await == 300).then_some(())
    })
    .await;
    assert!(
        stored.is_some(),
        "mallory's readings past the cap are still stored"
    );
    let (status, body) = d.latest(MALLORY, "?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    let series: usize = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|dev| dev["readings"].as_array().unwrap().len())
        .sum();
    assert!(series <= MAX_SERIES, "mallory keeps {series} series");
    let (_, body) = d.latest(ACME, "?device=acme-series-after").await;
    assert_eq!(
        body["devices"].as_array().map(Vec::len),
        Some(1),
        "acme's new series was not kept: {body}"
    );
}

async fn many_days(d: &Deployment) {
    let now = now_ns();
    let r: Vec<_> = (0..10)
        .map(|day| json!({"device": "m-days", "metric": "m", "ts": now - day * DAY_NS, "value": 1.0}))
        .collect();
    let (status, b, _) = d.post(MALLORY, &json!({ "readings": r })).await;
    assert_eq!((status, &b["error"]), (422, &json!("too_many_days")), "{b}");
}

async fn device_key(d: &Deployment) {
    let body = readings("m-device-key", 1, now_ns());
    let (status, b, _) = d.post(MALLORY_DEVICE, &body).await;
    assert_eq!(status, 202, "{b}");
    d.mallory_accepted
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (status, _) = d
        .router_call(reqwest::Method::GET, MALLORY_DEVICE, "/v1/subscriptions")
        .await;
    assert_eq!(status, 403, "list subscriptions");
    let (status, _) = d
        .subscribe(
            MALLORY_DEVICE,
            json!({"criteria": {}, "target": {"type": "live"}}),
        )
        .await;
    assert_eq!(status, 403, "create a subscription");
    let (status, _) = d.sql(MALLORY_DEVICE, "SELECT count(*) FROM readings").await;
    assert_eq!(status, 403, "query");
    let (status, _) = d.latest(MALLORY_DEVICE, "").await;
    assert_eq!(status, 403, "latest values");
    let (status, _, _) = d.post("no-such-key", &body).await;
    assert_eq!(status, 401, "an unknown key");
}

async fn tenant_in_request(d: &Deployment) {
    let now = now_ns();
    for body in [
        json!({"tenant": "acme", "readings": [{"device": "m-t", "metric": "m", "ts": now, "value": 1.0}]}),
        json!({"readings": [{"tenant": "acme", "device": "m-t", "metric": "m", "ts": now, "value": 1.0}]}),
    ] {
        let (status, b, _) = d.post(MALLORY, &body).await;
        assert_eq!(
            (status, &b["error"]),
            (400, &json!("tenant_in_body")),
            "{b}"
        );
    }
    let resp = d
        .client
        .post(format!("{}/v1/telemetry", d.ingest))
        .bearer_auth(MALLORY)
        .header("x-tenant", "acme")
        .header("x-sluice-tenant", "acme")
        .header("x-api-key", ACME)
        .json(&readings("m-header", 1, now))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status == 202 {
        d.mallory_accepted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sql = "SELECT count(*) FROM readings WHERE device = 'm-header'";
        let stored = sluice_testkit::wait::until(Duration::from_secs(30), || async {
            (d.rows("mallory", sql).await == 1).then_some(())
        })
        .await;
        assert!(stored.is_some(), "stored under mallory");
        assert_eq!(d.rows("acme", sql).await, 0, "stored under acme");
    } else {
        // Two keys that disagree may be refused outright; never taken as acme's.
        assert!((400..500).contains(&status), "{status}");
    }
}

async fn hostile_bodies(d: &Deployment) {
    let deep_json = "[".repeat(100_000).into_bytes();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("application/json", deep_json),
        ("application/json", b"{\"readings\": [".to_vec()),
        ("application/json", b"{\"readings\": [{\"device\": \"m-x\", \"metric\": \"m\", \"ts\": 1e400, \"value\": 1}]}".to_vec()),
        ("application/json", vec![0xff, 0xfe, 0x00]),
        ("application/msgpack", vec![0xdd, 0xff, 0xff, 0xff, 0xff]),
        ("application/msgpack", vec![0x91; 100_000]),
        ("application/msgpack", vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a']),
    ];
    for (ctype, body) in bodies {
        let (status, b, _) = d.post_raw(MALLORY, ctype, body).await;
        assert!((400..500).contains(&status), "{ctype}: {status} {b}");
        assert!(b["error"].is_string(), "a clear error: {b}");
    }
    d.all_running();
    d.acme_sends("acme-after-hostile-http", 1).await;
}
