//! The API's routes called with `oneshot`, over the in-memory store and the in-process
//! transport: no socket, no Redis, no broker.

use axum::body::Body;
use axum::http::{Method, Request};
use serde_json::{Value, json};
use sluice_binding::Topology;
use sluice_binding::transport::inproc::InProcessTransport;
use tower::ServiceExt;

use super::*;
use crate::matching::Index;
use crate::notify::webhook::WebhookConfig;

const ACME: &str = "k-acme";
const GLOBEX: &str = "k-globex";

const TENANTS: &str = r#"
[[tenant]]
id = "acme"
api_keys = ["k-acme", { key = "k-acme-device", scopes = ["ingest"] }]
amqp_exchanges = ["acme.alerts"]

[[tenant]]
id = "globex"
api_keys = ["k-globex"]
"#;

struct Api {
    app: Router,
    index: SharedIndex,
}

/// The API with an empty in-memory store; a tenant may hold `cap` subscriptions.
fn api(cap: usize) -> Api {
    let tenants = Tenants::from_toml_str(TENANTS).unwrap();
    let index = SharedIndex::new(Index::new());
    let transport = Transport::InProcess(InProcessTransport::new(Topology::default(), 16));
    let state = ApiState::new(ApiParts {
        amqp: AmqpGrants::new(tenants.clone(), "sluice"),
        tenants,
        store: Store::memory(cap),
        webhook: WebhookNotifier::new(WebhookConfig::default()).unwrap(),
        // Never connected: no test here follows a live feed.
        live: LiveFeed::new(
            redis::Client::open("redis://127.0.0.1:1").unwrap(),
            "sluice",
        ),
        live_slots: LiveSlots::new(2),
        transport,
        index: index.clone(),
        shutdown: CancellationToken::new(),
    });
    Api {
        app: app(state),
        index,
    }
}

/// A response: status, headers and the JSON body (`Null` if empty).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn error(&self) -> (&str, &str) {
        (
            self.body["error"].as_str().unwrap_or_default(),
            self.body["message"].as_str().unwrap_or_default(),
        )
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn create(&self, key: &str, body: Value) -> Answer {
        self.call(Method::POST, "/v1/subscriptions", Some(key), Some(body))
            .await
    }

    async fn get(&self, key: &str, path: &str) -> Answer {
        self.call(Method::GET, path, Some(key), None).await
    }

    async fn delete(&self, key: &str, path: &str) -> Answer {
        self.call(Method::DELETE, path, Some(key), None).await
    }

    fn indexed(&self, tenant: &str) -> Vec<Uuid> {
        self.index
            .load()
            .tenant_subscriptions(tenant)
            .iter()
            .map(|s| s.id)
            .collect()
    }
}

fn live() -> Value {
    json!({"criteria": {"devices": ["boiler-*"]}, "target": {"type": "live"}})
}

fn id_of(a: &Answer) -> Uuid {
    a.body["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn requests_without_a_known_key_are_unauthorized() {
    let api = api(10);
    for (key, message) in [(None, None), (Some("nope"), Some("unknown API key"))] {
        for (method, path) in [
            (Method::GET, "/v1/subscriptions"),
            (Method::POST, "/v1/subscriptions"),
            (
                Method::GET,
                "/v1/subscriptions/0190b4d2-0000-7000-8000-000000000000",
            ),
            (
                Method::DELETE,
                "/v1/subscriptions/0190b4d2-0000-7000-8000-000000000000",
            ),
        ] {
            let a = api.call(method.clone(), path, key, Some(live())).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {key:?}"
            );
            assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer");
            assert_eq!(a.error().0, "unauthorized");
            if let Some(m) = message {
                assert_eq!(a.error().1, m);
            }
        }
    }
    assert!(api.indexed("acme").is_empty());
}

#[tokio::test]
async fn a_key_without_the_subscribe_scope_is_forbidden_everywhere() {
    let api = api(10);
    let existing = id_of(&api.create(ACME, live()).await);
    for (method, path) in [
        (Method::GET, "/v1/subscriptions".to_owned()),
        (Method::POST, "/v1/subscriptions".to_owned()),
        (Method::GET, format!("/v1/subscriptions/{existing}")),
        (Method::DELETE, format!("/v1/subscriptions/{existing}")),
        (Method::GET, format!("/v1/subscriptions/{existing}/live")),
    ] {
        let a = api
            .call(method.clone(), &path, Some("k-acme-device"), Some(live()))
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(
            a.error(),
            (
                "forbidden",
                "this API key may not manage subscriptions: it lacks the subscribe scope"
            )
        );
    }
    // Nothing was created or deleted by the device key.
    assert_eq!(api.indexed("acme"), [existing]);
    assert_eq!(
        api.get(ACME, &format!("/v1/subscriptions/{existing}"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn create_list_get_and_delete() {
    let api = api(10);
    let created = api
        .create(
            ACME,
            json!({"name": "boilers", "criteria": {"devices": ["boiler-*"]},
                             "target": {"type": "webhook", "url": "http://93.184.216.34/hook"}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = id_of(&created);
    let path = format!("/v1/subscriptions/{id}");
    assert_eq!(created.headers[header::LOCATION], path.as_str());
    assert_eq!(created.body["tenant"], "acme");
    assert_eq!(created.body["name"], "boilers");
    assert_eq!(created.body["criteria"]["metrics"], json!(["*"]));
    // Read-your-writes: this instance matches it before the 201.
    assert_eq!(api.indexed("acme"), [id]);

    let listed = api.get(ACME, "/v1/subscriptions").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body, json!([created.body]));
    let one = api.get(ACME, &path).await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.body, created.body);

    assert_eq!(api.delete(ACME, &path).await.status, StatusCode::NO_CONTENT);
    assert!(api.indexed("acme").is_empty());
    for gone in [api.get(ACME, &path).await, api.delete(ACME, &path).await] {
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
        assert_eq!(gone.error(), ("not_found", "no such subscription"));
    }
    assert_eq!(api.get(ACME, "/v1/subscriptions").await.body, json!([]));
    // A malformed id names nothing: 404, like an unknown one.
    let bad = api.get(ACME, "/v1/subscriptions/not-a-uuid").await;
    assert_eq!(bad.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_tenant_never_sees_nor_deletes_another_s_subscription() {
    let api = api(10);
    let id = id_of(&api.create(ACME, live()).await);
    let path = format!("/v1/subscriptions/{id}");
    assert_eq!(api.get(GLOBEX, "/v1/subscriptions").await.body, json!([]));
    let seen = api.get(GLOBEX, &path).await;
    assert_eq!(seen.status, StatusCode::NOT_FOUND);
    assert_eq!(seen.error(), ("not_found", "no such subscription"));
    assert_eq!(
        api.delete(GLOBEX, &path).await.status,
        StatusCode::NOT_FOUND
    );
    let live_feed = api.get(GLOBEX, &format!("{path}/live")).await;
    assert_eq!(live_feed.status, StatusCode::NOT_FOUND);
    // Still there for its owner, and only in its owner's index.
    assert_eq!(api.get(ACME, &path).await.status, StatusCode::OK);
    assert_eq!(api.indexed("acme"), [id]);
    assert!(api.indexed("globex").is_empty());
}

#[tokio::test]
async fn invalid_subscriptions_are_refused_with_their_reason() {
    let api = api(10);
    let cases = [
        (
            json!({"criteria": {"devices": ["*"]}, "target": {"type": "webhook", "url": "ftp://x/y"}}),
            "invalid_subscription",
            "target.url: must start with http:// or https://",
        ),
        (
            json!({"criteria": {"devices": []}, "target": {"type": "live"}}),
            "invalid_subscription",
            "criteria.devices: ",
        ),
        (
            json!({"criteria": {}, "target": {"type": "webhook", "url": "http://127.0.0.1:9/hook"}}),
            "target_refused",
            "target.url: 127.0.0.1 is a loopback address",
        ),
        (
            json!({"criteria": {}, "target": {"type": "amqp", "exchange": "globex.alerts"}}),
            "target_refused",
            "target.exchange: exchange \"globex.alerts\" is not granted to tenant acme",
        ),
    ];
    for (body, code, message) in cases {
        let a = api.create(ACME, body.clone()).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(a.error().0, code, "{body}");
        assert!(a.error().1.starts_with(message), "{body}: {}", a.error().1);
    }
    // The shape itself: 400 with the path of the field.
    let a = api
        .create(
            ACME,
            json!({"criteria": {}, "target": {"type": "live"}, "colour": 1}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.error().0, "malformed_body");
    // A granted exchange passes.
    let ok = api
        .create(
            ACME,
            json!({"criteria": {}, "target": {"type": "amqp", "exchange": "acme.alerts"}}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    assert_eq!(api.indexed("acme").len(), 1, "only the valid one is stored");
}

#[tokio::test]
async fn a_body_must_be_json() {
    let api = api(10);
    let req = Request::post("/v1/subscriptions")
        .header(header::AUTHORIZATION, format!("Bearer {ACME}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(live().to_string()))
        .unwrap();
    let res = api.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn an_oversized_body_gets_a_json_413() {
    let api = api(10);
    let big = json!({"name": "x".repeat(70 * 1024), "criteria": {}, "target": {"type": "live"}});
    let a = api
        .call(Method::POST, "/v1/subscriptions", Some(ACME), Some(big))
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        a.error(),
        ("body_too_large", "the subscription is larger than 64 KiB")
    );
    assert!(api.indexed("acme").is_empty());
}

#[tokio::test]
async fn each_tenant_holds_at_most_its_cap() {
    let api = api(2);
    for _ in 0..2 {
        assert_eq!(api.create(ACME, live()).await.status, StatusCode::CREATED);
    }
    let refused = api.create(ACME, live()).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(
        refused.error(),
        (
            "too_many_subscriptions",
            "the tenant already has 2 subscriptions, the most allowed"
        )
    );
    assert_eq!(api.indexed("acme").len(), 2);
    // The cap is per tenant.
    assert_eq!(api.create(GLOBEX, live()).await.status, StatusCode::CREATED);
    // Deleting one makes room again.
    let first = api.indexed("acme")[0];
    let path = format!("/v1/subscriptions/{first}");
    assert_eq!(api.delete(ACME, &path).await.status, StatusCode::NO_CONTENT);
    assert_eq!(api.create(ACME, live()).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn matching_cost_is_bounded_per_pattern_subscription_and_tenant() {
    use crate::subscription::{MAX_SCANNED_PATTERN_BYTES, MAX_SCANNED_PER_TENANT};
    let api = api(100);
    let scanned = |metric: &str| json!({"criteria": {"devices": ["*-boiler"], "metrics": [metric]}, "target": {"type": "live"}});
    // Too many wildcards in one pattern.
    let a = api
        .create(
            ACME,
            json!({"criteria": {"devices": ["a*b*c*d*e*f*g*h*i*"]}, "target": {"type": "live"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.error().1.contains("at most 8 '*'"), "{}", a.body);
    // A scanned subscription with too many pattern bytes.
    let many: Vec<String> = (0..40)
        .map(|i| format!("*{}", "x".repeat(30 + i)))
        .collect();
    let a = api
        .create(
            ACME,
            json!({"criteria": {"devices": ["*"], "metrics": many}, "target": {"type": "live"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.error().1.contains(&MAX_SCANNED_PATTERN_BYTES.to_string()),
        "{}",
        a.body
    );
    // At most MAX_SCANNED_PER_TENANT scanned subscriptions per tenant...
    for i in 0..MAX_SCANNED_PER_TENANT {
        let a = api.create(ACME, scanned(&format!("*temp{i}"))).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
    let a = api.create(ACME, scanned("*temp")).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.error().0, "too_costly", "{}", a.body);
    // ...while indexed ones (a literal prefix on one side) are still taken, and other
    // tenants are not affected.
    let a = api
        .create(
            ACME,
            json!({"criteria": {"devices": ["plant-*"], "metrics": ["*temp"]}, "target": {"type": "live"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(
        api.create(GLOBEX, scanned("*temp")).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn redis_streams_are_always_bounded_per_target_and_per_tenant() {
    let api = api(100);
    let stream = |maxlen: Option<u64>| match maxlen {
        Some(n) => {
            json!({"criteria": {}, "target": {"type": "redis_stream", "stream": "s", "maxlen": n}})
        }
        None => json!({"criteria": {}, "target": {"type": "redis_stream", "stream": "s"}}),
    };
    for bad in [0, crate::subscription::MAX_STREAM_MAXLEN + 1] {
        let a = api.create(ACME, stream(Some(bad))).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
        assert!(a.error().1.contains("target.maxlen"), "{}", a.body);
    }
    // Two of a million, then the default's 10 000 no longer fits the tenant's 2 000 000.
    for _ in 0..2 {
        let a = api.create(ACME, stream(Some(1_000_000))).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
    let a = api.create(ACME, stream(None)).await;
    assert_eq!(
        (a.status, a.error().0),
        (StatusCode::UNPROCESSABLE_ENTITY, "too_costly"),
        "{}",
        a.body
    );
    // Other targets and other tenants are not affected.
    assert_eq!(api.create(ACME, live()).await.status, StatusCode::CREATED);
    assert_eq!(
        api.create(GLOBEX, stream(None)).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_live_feed_needs_a_live_target() {
    let api = api(10);
    let hook = api
        .create(
            ACME,
            json!({"criteria": {}, "target": {"type": "webhook", "url": "http://93.184.216.34/"}}),
        )
        .await;
    let path = format!("/v1/subscriptions/{}/live", id_of(&hook));
    let a = api.get(ACME, &path).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(a.error().0, "not_live");
}

#[tokio::test]
async fn health_endpoints_answer() {
    let api = api(10);
    for path in ["/livez", "/healthz", "/readyz"] {
        let a = api.call(Method::GET, path, None, None).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
    }
}

#[test]
fn each_tenant_holds_at_most_its_live_feeds_and_a_closed_one_frees_its_place() {
    let slots = LiveSlots::new(2);
    let (a1, a2) = (slots.take("acme").unwrap(), slots.take("acme").unwrap());
    assert!(slots.take("acme").is_none(), "acme is at its cap");
    let g = slots
        .take("globex")
        .expect("another tenant is not affected");
    drop(a1);
    let a3 = slots.take("acme").expect("a closed feed frees its place");
    drop((a2, a3, g));
    assert!(slots.open.lock().unwrap().is_empty());
}
