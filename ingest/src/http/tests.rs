//! The front end end to end on the in-process transport: requests through `app` with
//! `oneshot`, then the partition queues are consumed and decoded to see exactly what was
//! published.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use serde_json::{Value, json};
use sluice_binding::codec::decode;
use sluice_binding::model::now_ns;
use sluice_binding::transport::Transport;
use sluice_binding::transport::inproc::InProcessTransport;
use sluice_binding::{Partitioning, TenantId, Topology};
use tower::ServiceExt;

use super::*;
use sluice_binding::producer::ProducerConfig;

const DEMO_KEY: &str = "demo-key";
const ACME_KEY: &str = "acme-key";
/// A key of `acme` that may manage subscriptions but not send telemetry.
const ACME_SUBSCRIBE_KEY: &str = "acme-subscribe-key";

fn tenants() -> Tenants {
    Tenants::from_toml_str(&format!(
        "[[tenant]]\nid = \"demo\"\napi_keys = [\"{DEMO_KEY}\"]\n[[tenant]]\nid = \"acme\"\napi_keys = [\"{ACME_KEY}\", {{ key = \"{ACME_SUBSCRIBE_KEY}\", scopes = [\"subscribe\"] }}]\n"
    ))
    .unwrap()
}

fn transport(capacity: usize) -> Transport {
    Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), capacity))
}

async fn setup_with(cfg: IngestConfig, t: &Transport) -> (Router, AppState) {
    let producer = Producer::new(t.clone(), cfg.producer.clone());
    let state = AppState::new(cfg, tenants(), producer);
    (app(state.clone()), state)
}

/// An app over a declared in-process transport.
async fn setup(cfg: IngestConfig) -> (Router, AppState, Transport) {
    let t = transport(64);
    t.declare(&["storage"]).await.unwrap();
    let (app, state) = setup_with(cfg, &t).await;
    (app, state, t)
}

fn ts() -> i64 {
    now_ns() - 1_000_000_000
}

fn post(content_type: Option<&str>, key: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post("/v1/telemetry");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    b.body(body.into()).unwrap()
}

fn post_json(key: &str, body: &Value) -> Request<Body> {
    post(Some("application/json"), Some(key), body.to_string())
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, headers, body)
}

#[derive(Debug, PartialEq)]
struct Published {
    tenant: String,
    device: String,
    metric: String,
    ts: i64,
    value: f64,
}

/// Every reading waiting in the `storage` queues, batch by batch; also the batch count.
async fn published(t: &Transport) -> (usize, Vec<Published>) {
    let mut consumers = t.consume_group("storage", 1000).await.unwrap();
    let (mut batches, mut out) = (0, Vec::new());
    for c in &mut consumers {
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(20), c.next()).await {
            let v = decode(&d.body).unwrap();
            batches += 1;
            for i in 0..v.len() {
                out.push(Published {
                    tenant: v.tenant.to_owned(),
                    device: v.devices[v.d[i] as usize].to_owned(),
                    metric: v.metrics[v.m[i] as usize].to_owned(),
                    ts: v.t[i],
                    value: v.x[i],
                });
            }
            d.acker.ack().await.unwrap();
        }
    }
    out.sort_by(|a, b| a.value.total_cmp(&b.value));
    (batches, out)
}

fn reading(device: &str, ts: i64, value: f64) -> Value {
    json!({"device": device, "metric": "temp", "ts": ts, "value": value})
}

#[tokio::test]
async fn accepted_readings_are_published_under_the_key_tenant() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    let ts = ts();
    let body = json!({"readings": [reading("d1", ts, 21.5), reading("d2", ts + 1, 22.5)]});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer, json!({"accepted": 2}));
    let (_, got) = published(&t).await;
    let p = |device: &str, ts, value| Published {
        tenant: "demo".into(),
        device: device.into(),
        metric: "temp".into(),
        ts,
        value,
    };
    assert_eq!(got, [p("d1", ts, 21.5), p("d2", ts + 1, 22.5)]);
}

#[tokio::test]
async fn msgpack_bodies_and_x_api_key() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    #[derive(serde::Serialize)]
    struct R<'a> {
        device: &'a str,
        metric: &'a str,
        ts: i64,
        value: f64,
    }
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        readings: Vec<R<'a>>,
    }
    let ms = ts() / 1_000_000;
    let body = rmp_serde::to_vec_named(&Doc {
        readings: vec![R {
            device: "m1",
            metric: "kwh",
            ts: ms,
            value: 1.25,
        }],
    })
    .unwrap();
    for ct in ["application/msgpack", "application/x-msgpack"] {
        let req = Request::post("/v1/telemetry?precision=ms")
            .header(header::CONTENT_TYPE, ct)
            .header("x-api-key", ACME_KEY)
            .body(Body::from(body.clone()))
            .unwrap();
        let (status, _, answer) = call(&app, req).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{ct}: {answer}");
    }
    let (_, got) = published(&t).await;
    assert_eq!(got.len(), 2);
    for r in got {
        assert_eq!(
            (r.tenant.as_str(), r.device.as_str(), r.metric.as_str()),
            ("acme", "m1", "kwh")
        );
        assert_eq!(r.ts, ms * 1_000_000);
        assert_eq!(r.value, 1.25);
    }
}

#[tokio::test]
async fn a_big_request_spans_several_batches_and_tenants_stay_apart() {
    let cfg = IngestConfig {
        batch_max_readings: 10,
        ..IngestConfig::default()
    };
    let (app, _state, t) = setup(cfg).await;
    let ts = ts();
    let demo: Vec<Value> = (0..25).map(|i| reading("d", ts, f64::from(i))).collect();
    let acme: Vec<Value> = (100..103).map(|i| reading("d", ts, f64::from(i))).collect();
    let (a, b) = tokio::join!(
        call(&app, post_json(DEMO_KEY, &json!({ "readings": demo }))),
        call(&app, post_json(ACME_KEY, &json!({ "readings": acme }))),
    );
    assert_eq!((a.0, a.2), (StatusCode::ACCEPTED, json!({"accepted": 25})));
    assert_eq!((b.0, b.2), (StatusCode::ACCEPTED, json!({"accepted": 3})));
    let (batches, got) = published(&t).await;
    assert_eq!(
        batches, 4,
        "25 demo readings in batches of 10, and one acme batch"
    );
    let values: Vec<f64> = got.iter().map(|r| r.value).collect();
    let expected: Vec<f64> = (0..25).chain(100..103).map(f64::from).collect();
    assert_eq!(values, expected);
    assert!(got[..25].iter().all(|r| r.tenant == "demo"));
    assert!(got[25..].iter().all(|r| r.tenant == "acme"));
}

#[tokio::test]
async fn device_hash_partitioning_over_http() {
    let cfg = IngestConfig {
        producer: ProducerConfig {
            partitioning: Partitioning::DeviceHash,
            ..ProducerConfig::default()
        },
        ..IngestConfig::default()
    };
    let (app, _state, t) = setup(cfg).await;
    let ts = ts();
    let body =
        json!({"readings": [reading("a", ts, 1.0), reading("b", ts, 2.0), reading("a", ts, 3.0)]});
    let (status, _, _) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut consumers = t.consume_group("storage", 100).await.unwrap();
    for (partition, c) in consumers.iter_mut().enumerate() {
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(20), c.next()).await {
            let v = decode(&d.body).unwrap();
            assert_eq!(v.devices.len(), 1);
            let expected = sluice_binding::partition::fnv1a64(v.devices[0].as_bytes()) % 2;
            assert_eq!(partition as u64, expected);
            d.acker.ack().await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_tenant_in_the_body_is_refused_and_nothing_is_published() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    let body = json!({"tenant": "acme", "readings": [reading("d1", ts(), 1.0)]});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"], "tenant_in_body");
    assert_eq!(published(&t).await.0, 0);
}

#[tokio::test]
async fn one_invalid_reading_refuses_the_whole_request() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    let ts = ts();
    let body = json!({"readings": [
        reading("d1", ts, 1.0),
        {"device": "d1", "metric": "temp", "ts": ts, "value": "NaN"},
        reading("d1", 1000, 3.0),
    ]});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["error"], "invalid_reading");
    assert_eq!(answer["details_total"], 2);
    assert_eq!(
        answer["details"][0],
        json!({"index": 1, "field": "value", "problem": "value is NaN"})
    );
    assert_eq!(answer["details"][1]["index"], 2);
    assert_eq!(answer["details"][1]["field"], "ts");
    assert_eq!(
        published(&t).await.0,
        0,
        "nothing of a refused request is published"
    );
}

#[tokio::test]
async fn malformed_bodies_get_400_with_position() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    let req = post(
        Some("application/json"),
        Some(DEMO_KEY),
        "{\"readings\": [\n{]}",
    );
    let (status, _, answer) = call(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"], "malformed_body");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("line 2 column 2"), "{message}");
    let body = json!({"readings": [{"device": "d", "metric": "m", "ts": ts(), "value": [1]}]});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("readings[0].value"),
        "{answer}"
    );
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &json!({"readings": []}))).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("no_readings"))
    );
    let req = Request::post("/v1/telemetry?precision=hours")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {DEMO_KEY}"))
        .body(Body::from(
            json!({"readings": [reading("d", ts(), 1.0)]}).to_string(),
        ))
        .unwrap();
    let (status, _, answer) = call(&app, req).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_query"))
    );
    assert_eq!(published(&t).await.0, 0);
}

#[tokio::test]
async fn missing_wrong_or_unknown_keys_get_401() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    let body = json!({"readings": [reading("d1", ts(), 1.0)]}).to_string();
    let requests = [
        post(Some("application/json"), None, body.clone()),
        post(Some("application/json"), Some("not-a-key"), body.clone()),
        Request::post("/v1/telemetry")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Basic {DEMO_KEY}"))
            .body(Body::from(body.clone()))
            .unwrap(),
        Request::post("/v1/telemetry")
            .header(header::AUTHORIZATION, "Bearer ")
            .body(Body::from(body.clone()))
            .unwrap(),
    ];
    for req in requests {
        let (status, headers, answer) = call(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(answer["error"], "unauthorized");
    }
    assert_eq!(published(&t).await.0, 0);
}

#[tokio::test]
async fn a_key_without_the_ingest_scope_gets_403_and_sends_nothing() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    let body = json!({"readings": [reading("d1", ts(), 1.0)]}).to_string();
    let (status, _, answer) = call(
        &app,
        post(
            Some("application/json"),
            Some(ACME_SUBSCRIBE_KEY),
            body.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(answer["error"], "forbidden");
    assert_eq!(
        answer["message"],
        "this API key may not send telemetry: it lacks the ingest scope"
    );
    assert_eq!(published(&t).await.0, 0);
    let (status, _, _) = call(&app, post(Some("application/json"), Some(ACME_KEY), body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn oversized_bodies_get_a_json_413() {
    let cfg = IngestConfig {
        max_body_bytes: 100,
        ..IngestConfig::default()
    };
    let (app, _state, _t) = setup(cfg).await;
    let big = json!({"readings": [reading("d1", ts(), 1.0), reading("d2", ts(), 2.0)]}).to_string();
    assert!(big.len() > 100);
    // With Content-Length.
    let (status, _, answer) = call(
        &app,
        post(Some("application/json"), Some(DEMO_KEY), big.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"], "body_too_large");
    // Streamed, without Content-Length: the DefaultBodyLimit layer's refusal is ours too.
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(30)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let stream = Body::from_stream(futures::stream::iter(chunks));
    let (status, _, answer) =
        call(&app, post(Some("application/json"), Some(DEMO_KEY), stream)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"], "body_too_large");
}

#[tokio::test]
async fn too_many_readings_get_413() {
    let cfg = IngestConfig {
        max_readings_per_request: 2,
        ..IngestConfig::default()
    };
    let (app, _state, t) = setup(cfg).await;
    let ts = ts();
    let body =
        json!({"readings": [reading("a", ts, 1.0), reading("b", ts, 2.0), reading("c", ts, 3.0)]});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["error"], "too_many_readings");
    assert_eq!(published(&t).await.0, 0);
}

#[tokio::test]
async fn readings_over_too_many_days_get_422_and_nothing_is_published() {
    let (app, _state, t) = setup(IngestConfig::default()).await;
    const DAY: i64 = 86_400_000_000_000;
    let day = |n: i64| reading("d1", ts() - n * DAY, n as f64);
    let body = json!({"readings": (0..9).map(day).collect::<Vec<_>>()});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["error"], "too_many_days");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than 8 UTC days"), "{answer}");
    assert_eq!(published(&t).await.0, 0);
    // Eight days are fine.
    let body = json!({"readings": (0..8).map(day).collect::<Vec<_>>()});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
}

#[tokio::test]
async fn unsupported_content_types_get_415() {
    let (app, _state, _t) = setup(IngestConfig::default()).await;
    let body = json!({"readings": [reading("d1", ts(), 1.0)]}).to_string();
    for ct in [Some("text/plain"), Some("application/xml"), None] {
        let (status, _, answer) = call(&app, post(ct, Some(DEMO_KEY), body.clone())).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert_eq!(answer["error"], "unsupported_media_type");
    }
}

#[tokio::test]
async fn broker_failures_get_503_with_retry_after() {
    // The topology was never declared: every publish is unroutable.
    let t = transport(64);
    let cfg = IngestConfig {
        retry_after_secs: 7,
        ..IngestConfig::default()
    };
    let (app, _state) = setup_with(cfg, &t).await;
    let body = json!({"readings": [reading("d1", ts(), 1.0)]});
    let (status, headers, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    assert_eq!(answer["error"], "unavailable");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("unroutable"),
        "{answer}"
    );
}

#[tokio::test]
async fn requests_beyond_the_inflight_cap_get_503_at_once() {
    // Queues of one message and no consumer: the second batch waits for room, like a
    // confirm that does not come, and holds its request in flight.
    let t = transport(1);
    t.declare(&["storage"]).await.unwrap();
    let cfg = IngestConfig {
        max_inflight_requests: 1,
        producer: ProducerConfig {
            partitioning: Partitioning::DeviceHash,
            ..ProducerConfig::default()
        },
        ..IngestConfig::default()
    };
    let (app, _state) = setup_with(cfg, &t).await;
    let body = json!({"readings": [reading("d1", ts(), 1.0)]});
    let (status, _, _) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stuck = tokio::spawn({
        let (app, body) = (app.clone(), body.clone());
        async move { call(&app, post_json(DEMO_KEY, &body)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stuck.is_finished());
    let (status, headers, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer["error"], "overloaded");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    // Draining the queue lets the stuck request finish.
    let (batches, _) = published(&t).await;
    assert!(batches >= 1);
    assert_eq!(stuck.await.unwrap().0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn health_readiness_and_unknown_routes() {
    let (app, state, _t) = setup(IngestConfig::default()).await;
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    assert_eq!(call(&app, get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(call(&app, get("/readyz")).await.0, StatusCode::OK);
    let (status, _, answer) = call(&app, get("/nope")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, _, answer) = call(&app, get("/v1/telemetry")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    state.shutdown().await;
    let (status, _, answer) = call(&app, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer["message"], "shutting down");
    let body = json!({"readings": [reading("d1", ts(), 1.0)]});
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(
        (status, answer["message"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting down"))
    );
}

#[tokio::test]
async fn serve_finishes_inflight_requests_and_flushes_on_shutdown() {
    let t = transport(64);
    t.declare(&["storage"]).await.unwrap();
    // A linger far longer than the test: only the shutdown flush can send the batch.
    let cfg = IngestConfig {
        batch_linger: Duration::from_secs(3600),
        ..IngestConfig::default()
    };
    let producer = Producer::new(t.clone(), cfg.producer.clone());
    let state = AppState::new(cfg, tenants(), producer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let request = tokio::spawn(
        client
            .post(format!("http://{addr}/v1/telemetry"))
            .bearer_auth(DEMO_KEY)
            .header(header::CONTENT_TYPE, "application/json")
            .body(json!({"readings": [reading("d1", ts(), 42.0)]}).to_string())
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!request.is_finished(), "the batch waits for its linger");
    stop.send(()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("shutdown flushes the batcher")
        .unwrap()
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (_, got) = published(&t).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, 42.0);
    assert_eq!(got[0].tenant, TenantId::new("demo").unwrap().as_str());
}

#[tokio::test]
async fn a_request_refused_before_its_body_is_read_keeps_its_connection() {
    // Refused on its key, a 1 MB body is never parsed. Left unread, the server would close
    // on it (hyper drains only what has already arrived): the kernel resets a connection
    // closed with unread data, and a client still sending sees a broken pipe instead of
    // the 401. Drained, the answer arrives and the connection serves the next request.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = transport(64);
    t.declare(&["storage"]).await.unwrap();
    let cfg = IngestConfig::default();
    let producer = Producer::new(t.clone(), cfg.producer.clone());
    let state = AppState::new(cfg, tenants(), producer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    let request = |key: &str, ctype: &str, body: &[u8]| {
        let mut r = format!(
            "POST /v1/telemetry HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let good = json!({"readings": [reading("d1", ts(), 1.0)]}).to_string();
    let (mut rd, mut wr) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    let mut sent = request("wrong-key", "application/json", &vec![b' '; 1 << 20]);
    sent.extend(request(DEMO_KEY, "application/json", good.as_bytes()));
    // Written from another task: the first answer comes while the body is still going.
    let writer = tokio::spawn(async move { wr.write_all(&sent).await.map(|()| wr) });
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = String::from_utf8_lossy(&got);
            if text.matches("HTTP/1.1 ").count() >= 2 && text.trim_end().ends_with('}') {
                return Ok(text.into_owned());
            }
            match rd.read(&mut buf).await {
                Ok(0) => return Err(format!("closed after: {text}")),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("{e} after: {text}")),
            }
        }
    })
    .await
    .expect("both answers within 10 s");
    let text = answered.expect("the connection stays open for the second request");
    let statuses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["401", "202"], "{text}");
    assert!(text.contains("unknown API key"), "{text}");
    writer.await.unwrap().expect("the whole body was taken");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_tenant_trickling_bodies_cannot_lock_out_another() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = transport(64);
    t.declare(&["storage"]).await.unwrap();
    // Two tenants: each may hold half of the 8 places; a body gets 1 s to arrive.
    let cfg = IngestConfig {
        max_inflight_requests: 8,
        body_read_timeout: Duration::from_secs(1),
        ..IngestConfig::default()
    };
    let producer = Producer::new(t.clone(), cfg.producer.clone());
    let state = AppState::new(cfg, tenants(), producer);
    let app = app(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    // Tenant demo: 10 requests whose bodies never finish (headers, then 5 bytes of 1000).
    let mut trickling = Vec::new();
    for _ in 0..10 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/telemetry HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {DEMO_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"rea"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        trickling.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Tenant acme still has its share.
    let body = json!({"readings": [reading("d1", ts(), 1.0)]});
    let (status, _, answer) = call(&app, post_json(ACME_KEY, &body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // Tenant demo is at its share.
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"], "overloaded");
    assert!(
        answer["message"].as_str().unwrap().contains("tenant demo"),
        "{answer}"
    );
    // The trickled bodies time out with 408, and their places come back.
    let mut answer = vec![0; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), trickling[0].read(&mut answer))
        .await
        .expect("an answer within the body timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, answer) = call(&app, post_json(DEMO_KEY, &body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    drop(trickling);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

#[tokio::test]
async fn a_tenant_over_its_quota_gets_429_and_another_tenant_is_untouched() {
    let t = transport(64);
    t.declare(&["storage"]).await.unwrap();
    let cfg = IngestConfig::default();
    let demo = TenantId::new("demo").unwrap();
    let quota = sluice_binding::tenancy::Quota {
        readings_per_sec: 20,
        bytes_per_sec: 0,
    };
    let state = AppState::new(
        cfg.clone(),
        tenants().with_quota(&demo, quota),
        Producer::new(t.clone(), cfg.producer.clone()),
    );
    let app = app(state);
    let body = |from: u32, n: u32| json!({"readings": (from..from + n).map(|i| reading("d", ts(), f64::from(i))).collect::<Vec<_>>()});
    // More than a second of the quota can never fit: 413, not a 429 to retry forever.
    let (s, _, v) = call(&app, post_json(DEMO_KEY, &body(30, 21))).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_many_readings")),
        "{v}"
    );
    // The bucket holds a second of the rate: 20 readings, then nothing until it refills.
    let (s, _, _) = call(&app, post_json(DEMO_KEY, &body(0, 20))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, h, v) = call(&app, post_json(DEMO_KEY, &body(20, 10))).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"], "quota_exceeded");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("20 readings_per_sec"),
        "{v}"
    );
    assert_eq!(h[header::RETRY_AFTER], "1");
    // The refusal holds demo: a single reading, which the bucket has refilled by now, is
    // refused unread until the refused request would fit.
    let (s, _, v) = call(&app, post_json(DEMO_KEY, &body(30, 1))).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // Another tenant is not counted against it.
    let (s, _, _) = call(&app, post_json(ACME_KEY, &body(100, 500))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (_, got) = published(&t).await;
    let demo_values: Vec<f64> = got
        .iter()
        .filter(|p| p.tenant == "demo")
        .map(|p| p.value)
        .collect();
    assert_eq!(
        demo_values,
        (0..20).map(f64::from).collect::<Vec<_>>(),
        "nothing of the refused request"
    );
    assert_eq!(got.iter().filter(|p| p.tenant == "acme").count(), 500);
    // Refilled at 20 a second: 10 readings fit again after half a second.
    tokio::time::sleep(Duration::from_millis(550)).await;
    let (s, _, v) = call(&app, post_json(DEMO_KEY, &body(20, 10))).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

#[tokio::test]
async fn a_declared_length_over_the_byte_quota_is_refused_before_the_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = transport(64);
    t.declare(&["storage"]).await.unwrap();
    let cfg = IngestConfig {
        body_read_timeout: Duration::from_secs(30),
        ..IngestConfig::default()
    };
    let demo = TenantId::new("demo").unwrap();
    let quota = sluice_binding::tenancy::Quota {
        readings_per_sec: 0,
        bytes_per_sec: 10_000,
    };
    let state = AppState::new(
        cfg.clone(),
        tenants().with_quota(&demo, quota),
        Producer::new(t.clone(), cfg.producer.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    let head = |len: usize| {
        format!(
            "POST /v1/telemetry HTTP/1.1\r\nHost: sluice\r\nAuthorization: Bearer {DEMO_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // A length the bucket could never hold is 413, and spends nothing.
    let answer = |len: usize| async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(head(len).as_bytes()).await.unwrap();
        let mut answer = vec![0; 1024];
        // The answer waits for the unsent body to be discarded (DISCARD_TIMEOUT, 5 s),
        // well under the 30 s the body would get if it were being read.
        let n = tokio::time::timeout(Duration::from_secs(15), c.read(&mut answer))
            .await
            .expect("an answer without the body")
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    let text = answer(10_001).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // 9 900 declared bytes are spent at admission; the body never comes.
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(head(9_900).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 9 000 more do not fit for ≈ 0.7 s: 429, with no byte of the body sent. And the
    // refusal holds the tenant: 10 bytes, sent just after (the bucket would take them),
    // are refused unread too. Both answers wait out the discard of their unsent bodies.
    let (over, held) = tokio::join!(answer(9_000), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer(10).await
    });
    assert!(over.starts_with("HTTP/1.1 429"), "{over}");
    assert!(over.contains("10000 bytes_per_sec"), "{over}");
    assert!(held.starts_with("HTTP/1.1 429"), "{held}");
    drop(first);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}
