//! The read API through `app` with `oneshot`, over a readings table in a temporary
//! directory and latest values in memory.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use sluice_sinks::StagedBatch;
use sluice_sinks::table::{ReadingsTable, TableConfig};
use tower::ServiceExt;

use super::*;

const ACME_KEY: &str = "acme-key";
const GLOBEX_KEY: &str = "globex-key";
/// A key of acme that may send telemetry but not query.
const ACME_INGEST_KEY: &str = "acme-ingest-key";
/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000_000_000;

fn tenants() -> Tenants {
    Tenants::from_toml_str(&format!(
        "[[tenant]]\nid = \"acme\"\napi_keys = [\"{ACME_KEY}\", {{ key = \"{ACME_INGEST_KEY}\", scopes = [\"ingest\"] }}]\n\
         [[tenant]]\nid = \"globex\"\napi_keys = [\"{GLOBEX_KEY}\"]\n"
    ))
    .expect("tenants")
}

fn staged(tenant: &str, readings: &[(&str, &str, i64, f64)]) -> StagedBatch {
    StagedBatch::from_readings(tenant, readings.iter().copied())
}

/// acme: 100 readings of pump-0..pump-9 (metric temp, value i), one per second from T0;
/// globex: 7 readings.
async fn setup(config: QueryApiConfig) -> (Router, tempfile::TempDir, LatestStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8").to_owned();
    let table = ReadingsTable::open(TableConfig {
        store: root.clone(),
        ..TableConfig::default()
    })
    .await
    .expect("open");
    let devices: Vec<String> = (0..10).map(|i| format!("pump-{i}")).collect();
    let acme: Vec<(&str, &str, i64, f64)> = (0..100)
        .map(|i| {
            (
                devices[i % 10].as_str(),
                "temp",
                T0 + i as i64 * 1_000_000_000,
                i as f64,
            )
        })
        .collect();
    let globex: Vec<(&str, &str, i64, f64)> = (0..7).map(|i| ("g", "kwh", T0 + i, 1.0)).collect();
    let batches = vec![staged("acme", &acme), staged("globex", &globex)];
    table.commit(batches.clone()).await.expect("commit");
    let latest = LatestStore::memory();
    latest.update(&batches).await.expect("latest");
    let location = Location::parse(&root, BTreeMap::new()).expect("location");
    let state = AppState::new(config, tenants(), location, latest.clone()).expect("state");
    (app(state), dir, latest)
}

fn query(key: Option<&str>, content_type: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/v1/query");
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(Body::from(body.to_owned())).expect("request")
}

fn sql(key: &str, text: &str) -> Request<Body> {
    query(Some(key), Some("application/sql"), text)
}

async fn raw(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.expect("answer");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, headers, bytes.to_vec())
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let (status, _, bytes) = raw(app, req).await;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

#[tokio::test]
async fn sql_answers_json_rows_of_the_tenant_only() {
    let (app, _dir, _) = setup(QueryApiConfig::default()).await;
    let (status, body) = call(
        &app,
        sql(
            ACME_KEY,
            "SELECT count(*) AS n, sum(value) AS total FROM readings",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], json!([{"n": 100, "total": 4950.0}]));
    assert_eq!(body["columns"][0], json!({"name": "n", "type": "Int64"}));

    // The same statement as globex sees globex's rows; as JSON body too.
    let (status, body) = call(
        &app,
        query(
            Some(GLOBEX_KEY),
            Some("application/json"),
            &json!({"sql": "SELECT count(*) AS n FROM readings"}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], json!([{"n": 7}]));

    // Rows with timestamps as RFC 3339, and an empty result is an empty array.
    let (status, body) = call(
        &app,
        sql(
            ACME_KEY,
            "SELECT device, metric, ts, value FROM readings WHERE ts > '2026-11-21T10:01:38Z' ORDER BY ts",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["rows"],
        json!([{"device": "pump-9", "metric": "temp", "ts": "2026-11-21T10:01:39Z", "value": 99.0}])
    );
    let (_, body) = call(
        &app,
        sql(ACME_KEY, "SELECT * FROM readings WHERE value < 0"),
    )
    .await;
    assert_eq!(body["rows"], json!([]));
    assert_eq!(body["columns"].as_array().expect("columns").len(), 5);
}

#[tokio::test]
async fn sql_answers_an_arrow_ipc_stream() {
    let (app, _dir, _) = setup(QueryApiConfig::default()).await;
    let mut req = sql(
        ACME_KEY,
        "SELECT device, count(*) AS n FROM readings GROUP BY device ORDER BY device",
    );
    req.headers_mut()
        .insert(header::ACCEPT, sql::ARROW_STREAM.parse().expect("header"));
    let (status, headers, bytes) = raw(&app, req).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(headers[header::CONTENT_TYPE], sql::ARROW_STREAM);
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .expect("an Arrow stream");
    let batches: Vec<_> = reader.collect::<Result<_, _>>().expect("batches");
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 10);
    let n: i64 = batches
        .iter()
        .map(|b| {
            b.column(1)
                .as_primitive::<Int64Type>()
                .values()
                .iter()
                .sum::<i64>()
        })
        .sum();
    assert_eq!(n, 100);

    let mut req = sql(ACME_KEY, "SELECT 1");
    req.headers_mut()
        .insert(header::ACCEPT, "text/csv".parse().expect("header"));
    assert_eq!(call(&app, req).await.0, StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test]
async fn keys_without_the_query_scope_and_bad_requests_are_refused_clearly() {
    let (app, _dir, _) = setup(QueryApiConfig {
        max_sql_bytes: 100,
        ..QueryApiConfig::default()
    })
    .await;
    let q = "SELECT count(*) FROM readings";
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            query(None, None, q),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (sql("nope", q), StatusCode::UNAUTHORIZED, "unauthorized"),
        (sql(ACME_INGEST_KEY, q), StatusCode::FORBIDDEN, "forbidden"),
        (
            sql(ACME_KEY, "SELEC count(*) FROM readings"),
            StatusCode::BAD_REQUEST,
            "invalid_sql",
        ),
        (
            sql(ACME_KEY, "SELECT nope FROM readings"),
            StatusCode::BAD_REQUEST,
            "invalid_sql",
        ),
        (
            sql(ACME_KEY, "SELECT * FROM other"),
            StatusCode::BAD_REQUEST,
            "invalid_sql",
        ),
        (
            sql(ACME_KEY, "SELECT CAST(device AS DOUBLE) FROM readings"),
            StatusCode::BAD_REQUEST,
            "invalid_sql",
        ),
        (
            sql(ACME_KEY, "DROP TABLE readings"),
            StatusCode::BAD_REQUEST,
            "not_a_query",
        ),
        (
            sql(ACME_KEY, "COPY readings TO '/tmp/x.parquet'"),
            StatusCode::BAD_REQUEST,
            "not_a_query",
        ),
        (
            sql(ACME_KEY, "SET datafusion.execution.batch_size = 1"),
            StatusCode::BAD_REQUEST,
            "not_a_query",
        ),
        (
            sql(ACME_KEY, "  "),
            StatusCode::BAD_REQUEST,
            "malformed_body",
        ),
        (
            query(Some(ACME_KEY), Some("application/json"), "{\"query\": 1}"),
            StatusCode::BAD_REQUEST,
            "malformed_body",
        ),
        (
            query(Some(ACME_KEY), Some("application/xml"), q),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            sql(
                ACME_KEY,
                &format!("{q} WHERE device <> '{}'", "x".repeat(100)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "sql_too_large",
        ),
    ];
    for (req, want, code) in cases {
        let what = format!("{} {:?}", req.uri(), req.headers());
        let (status, body) = call(&app, req).await;
        assert_eq!(status, want, "{what}: {body}");
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(!body["message"].as_str().unwrap_or("").is_empty(), "{body}");
    }
    let (status, body) = call(
        &app,
        Request::get("/v1/nothing")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn queries_over_their_limits_are_cancelled_with_413_and_408() {
    let (app, _dir, _) = setup(QueryApiConfig {
        max_result_rows: 50,
        memory_limit: 64 * 1024,
        ..QueryApiConfig::default()
    })
    .await;
    let (status, body) = call(&app, sql(ACME_KEY, "SELECT * FROM readings")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "result_too_large");
    // Under the row limit, fine.
    let (status, _) = call(&app, sql(ACME_KEY, "SELECT * FROM readings LIMIT 50")).await;
    assert_eq!(status, StatusCode::OK);

    // A cross join of 100^3 rows sorted needs far more than 64 KiB.
    let heavy = "SELECT a.value + b.value + c.value AS v FROM readings a, readings b, readings c ORDER BY v DESC LIMIT 1000000";
    let (status, body) = call(&app, sql(ACME_KEY, heavy)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "query_memory_exceeded", "{body}");

    let (app, _dir, _) = setup(QueryApiConfig {
        timeout: Duration::from_millis(100),
        query_threads: 1,
        ..QueryApiConfig::default()
    })
    .await;
    // 100^4 = 10^8 rows to aggregate, seconds of work without a pause: answered 408 after
    // 100 ms all the same.
    let slow = "SELECT count(*) FROM readings a, readings b, readings c, readings d WHERE a.value + b.value + c.value + d.value > -1";
    let started = std::time::Instant::now();
    let (status, body) = call(&app, sql(ACME_KEY, slow)).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert_eq!(body["error"], "query_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_tenant_at_its_query_limit_gets_429_and_others_keep_their_slots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let location =
        Location::parse(dir.path().to_str().expect("utf-8"), BTreeMap::new()).expect("location");
    let state = AppState::new(
        QueryApiConfig {
            max_concurrent_per_tenant: 1,
            max_concurrent_queries: 2,
            ..QueryApiConfig::default()
        },
        tenants(),
        location,
        LatestStore::memory(),
    )
    .expect("state");
    let app = app(state.clone());
    // acme holds its one slot (as a long query would).
    let held = state.take_slots("acme").expect("a slot");
    let (status, body) = call(&app, sql(ACME_KEY, "SELECT 1 AS one")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "too_many_queries");
    let (status, body) = call(&app, sql(GLOBEX_KEY, "SELECT 1 AS one")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Both process slots taken: 503 for the next tenant.
    let other = state.take_slots("globex").expect("a slot");
    let (status, body) = call(&app, sql(GLOBEX_KEY, "SELECT 1 AS one")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    drop(other);
    drop(held);
    let (status, body) = call(&app, sql(ACME_KEY, "SELECT 1 AS one")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], json!([{"one": 1}]));
}

fn latest(key: &str, query: &str) -> Request<Body> {
    Request::get(format!("/v1/latest{query}"))
        .header("x-api-key", key)
        .body(Body::empty())
        .expect("request")
}

#[tokio::test]
async fn latest_values_filtered_and_paged() {
    let (app, _dir, _) = setup(QueryApiConfig::default()).await;
    let (status, body) = call(&app, latest(ACME_KEY, "?device=pump-9")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"devices": [{"device": "pump-9", "readings": [
            {"metric": "temp", "ts": "2026-11-21T10:01:39Z", "ts_ns": T0 + 99_000_000_000, "value": 99.0}
        ]}], "next_after": null})
    );

    // Pages of 4 over pump-0..pump-9 by name.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("?device=pump-*&limit=4&after={a}"),
            None => "?device=pump-*&limit=4".to_owned(),
        };
        let (status, body) = call(&app, latest(ACME_KEY, &q)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for d in body["devices"].as_array().expect("devices") {
            seen.push(d["device"].as_str().expect("name").to_owned());
        }
        match body["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
    }
    let want: Vec<String> = (0..10).map(|i| format!("pump-{i}")).collect();
    assert_eq!(seen, want);

    // Other tenants' devices are not there; a metric filter that matches nothing.
    let (_, body) = call(&app, latest(GLOBEX_KEY, "")).await;
    assert_eq!(body["devices"].as_array().expect("devices").len(), 1);
    assert_eq!(body["devices"][0]["device"], "g");
    let (_, body) = call(&app, latest(ACME_KEY, "?metric=kwh")).await;
    assert_eq!(body["devices"], json!([]));

    for bad in [
        "?limit=0",
        "?limit=100000",
        "?limit=x",
        "?colour=red",
        "?device=",
    ] {
        let (status, body) = call(&app, latest(ACME_KEY, bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_parameter", "{bad}: {body}");
    }
    let (status, _) = call(&app, latest(ACME_INGEST_KEY, "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
