//! `sluice query-api` over what `sluice process` stored (the readings table and the latest
//! values in Redis), and the same routes beside ingest's in `sluice embedded --serve`: the
//! answers agree with the table and Redis, and each tenant reads only its own.

use std::process::Command;
use std::time::Duration;

use crate::support::broker::*;
use crate::support::*;

/// `(status, JSON body)` of a read.
fn read(http: &Http, req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    http.rt.block_on(async {
        let resp = req.send().await.expect("an answer");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, body)
    })
}

fn sql(http: &Http, url: &str, key: &str, text: &str) -> (u16, serde_json::Value) {
    read(
        http,
        http.client
            .post(format!("{url}/v1/query"))
            .bearer_auth(key)
            .header("content-type", "application/sql")
            .body(text.to_owned()),
    )
}

fn latest(http: &Http, url: &str, key: &str, query: &str) -> (u16, serde_json::Value) {
    read(
        http,
        http.client
            .get(format!("{url}/v1/latest{query}"))
            .header("x-api-key", key),
    )
}

#[test]
fn the_query_api_reads_the_table_and_redis_per_tenant() {
    let w = World::new();
    let _processors = w.processors();
    let s = w.loadgen(&[
        "--target",
        "amqp",
        "--tenant",
        "acme",
        "--devices",
        "20",
        "--metrics",
        "2",
        "--count",
        "20000",
        "--rate",
        "50000",
        "--duration",
        "60s",
    ]);
    assert_eq!(s["accepted"], 20_000, "{s}");
    w.wait_for_rows("acme", 20_000, Duration::from_secs(60));

    let port = free_port();
    let mut cmd = Command::new(sluice_bin());
    w.common(&mut cmd);
    cmd.arg("query-api")
        .env("SLUICE_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLUICE_TENANTS", &w.tenants)
        .env("SLUICE_STORE", w.data())
        .env("SLUICE_REDIS_URL", redis_url())
        .env("SLUICE_REDIS_PREFIX", w.ns.name());
    let api = Proc::spawn("query-api", &mut cmd);
    let url = format!("http://127.0.0.1:{port}");
    let http = Http::new();
    wait_until("query-api /readyz", Duration::from_secs(30), || {
        http.ready(&format!("{url}/readyz"))
    });

    let (status, body) = sql(
        &http,
        &url,
        "acme-key",
        "SELECT count(*) AS n, count(DISTINCT device) AS devices FROM readings",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"][0]["n"], total_rows(&w.data(), "acme"));
    assert_eq!(body["rows"][0]["n"], 20_000);
    assert_eq!(body["rows"][0]["devices"], 20);
    let (status, body) = sql(
        &http,
        &url,
        "other-key",
        "SELECT count(*) AS n FROM readings",
    );
    assert_eq!(
        (status, &body["rows"][0]["n"]),
        (200, &serde_json::json!(0)),
        "{body}"
    );
    let (status, body) = sql(&http, &url, "acme-key", "DELETE FROM readings");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("not_a_query")),
        "{body}"
    );

    // Every device's latest values, as Redis holds them.
    let (status, body) = latest(&http, &url, "acme-key", "?limit=1000");
    assert_eq!(status, 200, "{body}");
    let devices = body["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 20, "{body}");
    for d in devices {
        let name = d["device"].as_str().expect("name");
        let got: Vec<(String, i64, f64)> = d["readings"]
            .as_array()
            .expect("readings")
            .iter()
            .map(|r| {
                (
                    r["metric"].as_str().expect("metric").to_owned(),
                    r["ts_ns"].as_i64().expect("ts_ns"),
                    r["value"].as_f64().expect("value"),
                )
            })
            .collect();
        assert_eq!(got, w.latest("acme", name), "{name}");
        assert_eq!(got.len(), 2);
    }
    let first = devices[0]["device"].as_str().expect("name").to_owned();
    let (_, body) = latest(
        &http,
        &url,
        "acme-key",
        &format!("?device={first}&metric=*-1"),
    );
    assert_eq!(
        body["devices"].as_array().expect("devices").len(),
        1,
        "{body}"
    );
    assert_eq!(
        body["devices"][0]["readings"].as_array().expect("r").len(),
        1,
        "{body}"
    );
    let (_, body) = latest(&http, &url, "other-key", "");
    assert_eq!(body["devices"], serde_json::json!([]), "{body}");
    let (status, _) = latest(&http, &url, "wrong-key", "");
    assert_eq!(status, 401);

    assert!(api.terminate().success(), "query-api exits 0 on SIGTERM");
}

#[test]
fn embedded_serves_the_reads_beside_ingest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(sluice_bin());
    cmd.args([
        "embedded",
        "--serve",
        "--metrics-listen",
        "",
        "--flush-interval",
        "100ms",
    ])
    .args(["--listen", &format!("127.0.0.1:{port}")])
    .arg("--store")
    .arg(dir.path().join("data"))
    .env_remove("SLUICE_REDIS_URL");
    let embedded = Proc::spawn("embedded", &mut cmd);
    let http = Http::new();
    wait_until("embedded /readyz", Duration::from_secs(30), || {
        http.ready(&format!("{url}/readyz"))
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    let readings: Vec<serde_json::Value> = (0..10)
        .map(|i| serde_json::json!({"device": format!("d{}", i % 2), "metric": "m", "ts": now - 1_000_000_000 + i, "value": i}))
        .collect();
    let (status, body) = http.post(
        &format!("{url}/v1/telemetry"),
        Some("demo-key-change-me"),
        "application/json",
        serde_json::json!({ "readings": readings })
            .to_string()
            .into_bytes(),
    );
    assert_eq!(status, 202, "{body}");
    wait_until("10 rows readable", Duration::from_secs(30), || {
        let (_, body) = sql(
            &http,
            &url,
            "demo-key-change-me",
            "SELECT count(*) AS n FROM readings",
        );
        body["rows"][0]["n"] == 10
    });
    let (status, body) = latest(&http, &url, "demo-key-change-me", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices"][0]["device"], "d0");
    assert_eq!(body["devices"][0]["readings"][0]["value"], 8.0);
    assert_eq!(body["devices"][1]["readings"][0]["value"], 9.0);
    assert!(embedded.terminate().success());
}
