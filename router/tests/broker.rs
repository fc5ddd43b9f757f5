//! The router against a real RabbitMQ (`AMQP_ADDR`), a real Redis (`REDIS_URL`) and a real
//! HTTP receiver in the test. Each test has its own namespace on the broker and in Redis,
//! and deletes its queues and keys afterwards.
#![cfg(feature = "broker-tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Value, json};
use sluice_binding::codec;
use sluice_binding::event::{DerivedEvent, Event, EventKind, FORMAT_VERSION};
use sluice_binding::model::{BatchBuilder, now_ns};
use sluice_binding::tenancy::Tenants;
use sluice_binding::transport::amqp::AmqpTransport;
use sluice_binding::transport::{Outgoing, Transport};
use sluice_router::job::Job;
use sluice_router::outbox::Outbox;
use sluice_router::{RouterConfig, WebhookConfig};
use sluice_testkit::env::redis_url;
use sluice_testkit::wait::until;
use sluice_testkit::{Namespace, amqp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PARTITIONS: u32 = 2;
const NOTIFY_PARTITIONS: u32 = 2;
const KEY_A: &str = "key-tenant-a";
const KEY_B: &str = "key-tenant-b";

/// Tenant A is granted the exchanges `{ns}-a` and `{ns}-a-gone` (never declared) and,
/// by operator error, `{ns}.telemetry`; tenant B `{ns}-b`.
fn tenants(ns: &str) -> Tenants {
    Tenants::from_toml_str(&format!(
        "[[tenant]]\nid = \"tenant-a\"\napi_keys = [\"{KEY_A}\"]\n\
         amqp_exchanges = [\"{ns}-a\", \"{ns}-a-gone\", \"{ns}.telemetry\"]\n\
         [[tenant]]\nid = \"tenant-b\"\napi_keys = [\"{KEY_B}\"]\n\
         amqp_exchanges = [\"{ns}-b\"]\n"
    ))
    .expect("tenants")
}

/// Declares the fanout exchange `exchange` and a queue `{exchange}.q` bound to it; returns
/// the queue's name.
async fn target_exchange(ch: &lapin::Channel, exchange: &str) -> String {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = format!("{exchange}.q");
    ch.queue_declare(
        queue.clone().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.clone().into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    queue
}

/// One running router with its API, on a namespace of its own.
struct Router {
    api: String,
    transport: AmqpTransport,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn test_config(ns: &str) -> RouterConfig {
    let mut cfg = RouterConfig {
        redis_url: redis_url(),
        redis_namespace: ns.to_owned(),
        notify_partitions: NOTIFY_PARTITIONS,
        ..RouterConfig::default()
    };
    cfg.webhook = WebhookConfig {
        allow: vec!["127.0.0.1".parse().expect("allow rule")],
        timeout: Duration::from_secs(2),
        breaker_open_for: Duration::from_secs(1),
        ..WebhookConfig::default()
    };
    cfg.deliver.retry_initial = Duration::from_millis(500);
    cfg.deliver.retry_max = Duration::from_secs(2);
    cfg
}

impl Router {
    async fn start(ns: &str, tweak: impl FnOnce(&mut RouterConfig)) -> Self {
        let mut cfg = test_config(ns);
        tweak(&mut cfg);
        let topology = sluice_binding::Topology::new(ns, PARTITIONS);
        let transport = amqp::transport(&topology, "sluice-router-test").await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let (t, s) = (transport.clone(), stop.clone());
        let ns_owned = ns.to_owned();
        let task = tokio::spawn(async move {
            sluice_router::run(t, Some(listener), tenants(&ns_owned), cfg, s)
                .await
                .expect("router runs");
        });
        // The API answers once the router declared its topology and loaded the index.
        let client = reqwest::Client::new();
        until(Duration::from_secs(5), || async {
            client.get(format!("{api}/healthz")).send().await.ok()
        })
        .await;
        Self {
            api,
            transport,
            stop,
            task,
        }
    }

    async fn subscribe(&self, key: &str, body: Value) -> Value {
        let (status, v) = api(
            reqwest::Method::POST,
            &format!("{}/v1/subscriptions", self.api),
            key,
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{v}");
        v
    }

    /// Publishes one telemetry batch of `tenant` and waits for the broker's confirm.
    async fn publish(&self, tenant: &str, readings: &[(&str, &str, f64)]) -> Uuid {
        let mut b = BatchBuilder::new(tenant, "router-test", 0);
        for (i, (d, m, x)) in readings.iter().enumerate() {
            b.push(d, m, now_ns() - 1000 + i as i64, *x);
        }
        let b = b.finish(now_ns());
        let body = codec::encode(&b).unwrap();
        Transport::Amqp(self.transport.clone())
            .publish(Outgoing {
                partition: (b.id.as_u128() % u128::from(PARTITIONS)) as u32,
                body: &body,
                batch_id: b.id,
                producer: "router-test",
            })
            .await
            .expect("published");
        b.id
    }

    /// Subscribes with `key` until the subscription lands on the notify queue of
    /// `other` (deleting the ones that do not); its id.
    async fn subscribe_beside(&self, key: &str, body: Value, other: Uuid) -> Uuid {
        let outbox = Outbox::new(self.transport.clone(), NOTIFY_PARTITIONS);
        for _ in 0..32 {
            let s = self.subscribe(key, body.clone()).await;
            let id: Uuid = s["id"].as_str().unwrap().parse().unwrap();
            if outbox.partition_of(id) == outbox.partition_of(other) {
                return id;
            }
            let url = format!("{}/v1/subscriptions/{id}", self.api);
            assert_eq!(api(reqwest::Method::DELETE, &url, key, None).await.0, 204);
        }
        panic!("no subscription landed on the notify queue of {other}");
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.transport.close().await;
    }
}

async fn api(method: reqwest::Method, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("API reachable");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Runs `test` with a fresh namespace, then deletes the namespace's queues, exchanges and
/// Redis keys (the router's included), then re-raises a panic.
async fn with_namespace<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let ns = Namespace::new("rt")
        .on_broker(PARTITIONS, &["router"])
        .with_router(NOTIFY_PARTITIONS)
        .in_redis();
    // The tenants' target exchanges, as `target_exchange` declares them.
    for tenant in ["a", "b"] {
        ns.add_exchange(format!("{}-{tenant}", ns.name()));
        ns.add_queue(format!("{}-{tenant}.q", ns.name()));
    }
    ns.guard(test(ns.name().to_owned())).await;
}

/// A webhook receiver: records every notification; answers 503 while `down`, or
/// `status` if set.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(Instant, HeaderMap, Value)>>>,
    down_until: Arc<Mutex<Option<Instant>>>,
    status: Arc<Mutex<Option<u16>>>,
    /// Answers (and records) each notification this long after it arrived.
    slow: Arc<Mutex<Option<Duration>>>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let r = Receiver::default();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, url)
    }

    fn notifications(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, v)| v.clone())
            .collect()
    }

    fn event_ids(&self) -> Vec<String> {
        ids_of(&self.notifications())
    }

    async fn wait_events(&self, n: usize, within: Duration) -> Vec<String> {
        until(within, || async {
            let ids = self.event_ids();
            (ids.len() >= n).then_some(ids)
        })
        .await
        .unwrap_or_else(|| panic!("expected {n} events, got {:?}", self.event_ids()))
    }
}

async fn hook(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    if r.down_until
        .lock()
        .unwrap()
        .is_some_and(|t| Instant::now() < t)
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(s) = *r.status.lock().unwrap() {
        return StatusCode::from_u16(s).unwrap();
    }
    let slow = *r.slow.lock().unwrap();
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    let v: Value = serde_json::from_slice(&body).expect("notification is JSON");
    r.got.lock().unwrap().push((Instant::now(), headers, v));
    StatusCode::NO_CONTENT
}

fn ids_of(notifications: &[Value]) -> Vec<String> {
    notifications
        .iter()
        .flat_map(|n| n["events"].as_array().cloned().unwrap_or_default())
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

fn reading_id(batch: Uuid, i: u32) -> String {
    Event::reading_id(batch, i)
}

#[tokio::test]
async fn each_notifier_delivers_what_matched_and_nothing_else() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let (hook, url) = Receiver::start().await;
        router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["boiler-*"], "metrics": ["temp"], "value": {"above": 50}},
                                     "target": {"type": "webhook", "url": url}}))
            .await;
        // AMQP target: an exchange granted to the tenant, with a queue of the subscriber's.
        let (conn, ch) = amqp::connect().await;
        let queue = target_exchange(&ch, &format!("{ns}-a")).await;
        router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["pump-1"]}, "policy": {"content": "ids"},
                                     "target": {"type": "amqp", "exchange": format!("{ns}-a"), "routing_key": "pumps"}}))
            .await;
        router
            .subscribe(KEY_A, json!({"criteria": {"metrics": ["hum?d"]},
                                     "target": {"type": "redis_stream", "stream": "humidity"}}))
            .await;
        let live = router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["fan-*"], "value": {"outside": [0, 10]}}, "target": {"type": "live"}}))
            .await;
        // The live feed, read as a dashboard would.
        let sse = reqwest::Client::new()
            .get(format!("{}/v1/subscriptions/{}/live", router.api, live["id"].as_str().unwrap()))
            .bearer_auth(KEY_A)
            .send()
            .await
            .unwrap();
        assert_eq!(sse.status(), 200);
        let live_text = Arc::new(Mutex::new(String::new()));
        let lt = live_text.clone();
        tokio::spawn(async move {
            let mut s = sse.bytes_stream();
            while let Some(Ok(chunk)) = s.next().await {
                lt.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk));
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;

        let b = router
            .publish("tenant-a", &[
                ("boiler-1", "temp", 60.0),  // 0: webhook
                ("boiler-1", "temp", 40.0),  // 1: below threshold
                ("boiler-2", "press", 90.0), // 2: other metric
                ("pump-1", "rpm", 5.0),      // 3: amqp
                ("pump-2", "rpm", 5.0),      // 4: other device
                ("room", "humid", 55.0),     // 5: redis stream
                ("room", "humidity", 55.0),  // 6: `?` is one character
                ("fan-3", "speed", 12.0),    // 7: live
                ("fan-3", "speed", 5.0),     // 8: inside the range
            ])
            .await;
        // Another tenant's identical readings notify nobody of tenant A.
        router.publish("tenant-b", &[("boiler-1", "temp", 99.0), ("pump-1", "rpm", 1.0), ("fan-3", "speed", 50.0)]).await;

        assert_eq!(hook.wait_events(1, Duration::from_secs(10)).await, [reading_id(b, 0)]);
        let got = until(Duration::from_secs(10), || async {
            ch.basic_get(queue.clone().into(), BasicGetOptions::default()).await.ok().flatten()
        })
        .await
        .expect("AMQP notification");
        let n: Value = serde_json::from_slice(&got.delivery.data).unwrap();
        got.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        assert_eq!(ids_of(std::slice::from_ref(&n)), [reading_id(b, 3)]);
        assert!(n["events"][0].get("value").is_none(), "content ids carries no value: {n}");
        assert_eq!(got.delivery.properties.message_id().as_ref().map(|s| s.to_string()), n["id"].as_str().map(str::to_owned));

        let client = redis::Client::open(redis_url()).unwrap();
        let mut rc = client.get_multiplexed_async_connection().await.unwrap();
        let stream_key = format!("{ns}:notify:tenant-a:humidity");
        let entries = until(Duration::from_secs(10), || {
            let mut rc = rc.clone();
            let key = stream_key.clone();
            async move {
                let v: redis::streams::StreamRangeReply =
                    redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query_async(&mut rc).await.unwrap();
                (!v.ids.is_empty()).then_some(v)
            }
        })
        .await
        .expect("stream entry");
        let json: String = entries.ids[0].get("notification").unwrap();
        assert_eq!(ids_of(&[serde_json::from_str(&json).unwrap()]), [reading_id(b, 5)]);

        let live_ids = until(Duration::from_secs(10), || async {
            let text = live_text.lock().unwrap().clone();
            let ids: Vec<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .flat_map(|d| ids_of(&[serde_json::from_str(d.trim()).unwrap()]))
                .collect();
            (!ids.is_empty()).then_some(ids)
        })
        .await
        .expect("live notification");
        assert_eq!(live_ids, [reading_id(b, 7)]);

        // Nothing else arrives.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(hook.event_ids(), [reading_id(b, 0)]);
        assert!(ch.basic_get(queue.clone().into(), BasicGetOptions::default()).await.unwrap().is_none());
        let len: usize = redis::cmd("XLEN").arg(&stream_key).query_async(&mut rc).await.unwrap();
        assert_eq!(len, 1);
        let _ = conn.close(200, "done".into()).await;
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn batch_notify_groups_by_count_then_by_duration() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let (hook, url) = Receiver::start().await;
        router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["d-*"]}, "policy": {"batch_notify": {"count": 5, "duration": "1500ms"}},
                                     "target": {"type": "webhook", "url": url}}))
            .await;
        let readings: Vec<(String, &str, f64)> = (0..12).map(|i| (format!("d-{i}"), "m", f64::from(i))).collect();
        let refs: Vec<(&str, &str, f64)> = readings.iter().map(|(d, m, x)| (d.as_str(), *m, *x)).collect();
        let sent = Instant::now();
        let b = router.publish("tenant-a", &refs).await;
        let ids = hook.wait_events(12, Duration::from_secs(10)).await;
        let expected: BTreeSet<String> = (0..12).map(|i| reading_id(b, i)).collect();
        assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
        let got = hook.got.lock().unwrap().clone();
        let sizes: Vec<usize> = got.iter().map(|(_, _, n)| n["events"].as_array().unwrap().len()).collect();
        assert_eq!(sizes, [5, 5, 2], "two full batches, then the rest at the deadline");
        let rest_after = got[2].0 - sent;
        assert!(rest_after >= Duration::from_millis(1400), "the partial batch waited for its duration: {rest_after:?}");
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn rate_limit_holds_pending_and_latest_notify_keeps_only_the_newest() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let (all, all_url) = Receiver::start().await;
        let (latest, latest_url) = Receiver::start().await;
        router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["r-1"]}, "policy": {"rate_limit": {"max": 2, "window": "2s"}},
                                     "target": {"type": "webhook", "url": all_url}}))
            .await;
        router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["r-2"]}, "policy": {"rate_limit": {"max": 2, "window": "2s", "latest_notify": true}},
                                     "target": {"type": "webhook", "url": latest_url}}))
            .await;
        let readings: Vec<(&str, &str, f64)> = (0..6).flat_map(|i| [("r-1", "m", f64::from(i)), ("r-2", "m", f64::from(i))]).collect();
        let b = router.publish("tenant-a", &readings).await;

        // Without latest_notify: all six arrive, never more than two in any 2 s window.
        let ids = all.wait_events(6, Duration::from_secs(20)).await;
        let expected: BTreeSet<String> = (0..6).map(|i| reading_id(b, 2 * i)).collect();
        assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
        let times: Vec<Instant> = all.got.lock().unwrap().iter().map(|(t, _, _)| *t).collect();
        for (i, t) in times.iter().enumerate().skip(2) {
            // Receipt times lag send times a little; allow 150 ms of it.
            assert!(*t - times[i - 2] >= Duration::from_millis(1850), "3 notifications within one window: {times:?}");
        }

        // latest_notify: two at once, then only the newest of the four held back.
        let latest_ids = latest.wait_events(3, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let latest_ids_after = latest.event_ids();
        assert_eq!(latest_ids_after, latest_ids, "nothing after the newest pending one");
        assert_eq!(latest_ids.len(), 3, "{latest_ids:?}");
        assert_eq!(latest_ids[2], reading_id(b, 11), "the newest reading of r-2 is the one kept");
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn expiration_counter_ends_the_subscription() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let (hook, url) = Receiver::start().await;
        let sub = router
            .subscribe(KEY_A, json!({"criteria": {}, "policy": {"expiration_counter": 3}, "target": {"type": "webhook", "url": url}}))
            .await;
        router.publish("tenant-a", &[("e", "m", 1.0), ("e", "m", 2.0), ("e", "m", 3.0), ("e", "m", 4.0), ("e", "m", 5.0)]).await;
        hook.wait_events(3, Duration::from_secs(10)).await;
        let url = format!("{}/v1/subscriptions/{}", router.api, sub["id"].as_str().unwrap());
        let gone = until(Duration::from_secs(5), || async {
            let (s, _) = api(reqwest::Method::GET, &url, KEY_A, None).await;
            (s == 404).then_some(())
        })
        .await;
        assert!(gone.is_some(), "the subscription is deleted after its last notification");
        router.publish("tenant-a", &[("e", "m", 6.0)]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(hook.notifications().len(), 3);
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn tenants_cannot_read_or_match_each_other() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let (hook_a, url_a) = Receiver::start().await;
        let (hook_b, url_b) = Receiver::start().await;
        let sub_a = router.subscribe(KEY_A, json!({"criteria": {}, "target": {"type": "webhook", "url": url_a}})).await;
        assert_eq!(sub_a["tenant"], "tenant-a");
        // B subscribes to everything, with the same device names as A's.
        router.subscribe(KEY_B, json!({"criteria": {"devices": ["*"]}, "target": {"type": "webhook", "url": url_b}})).await;
        let a_url = format!("{}/v1/subscriptions/{}", router.api, sub_a["id"].as_str().unwrap());
        assert_eq!(api(reqwest::Method::GET, &a_url, KEY_B, None).await.0, 404);
        assert_eq!(api(reqwest::Method::DELETE, &a_url, KEY_B, None).await.0, 404);
        assert_eq!(api(reqwest::Method::GET, &format!("{}/live", a_url), KEY_B, None).await.0, 404);
        let (s, list_b) = api(reqwest::Method::GET, &format!("{}/v1/subscriptions", router.api), KEY_B, None).await;
        assert_eq!(s, 200);
        assert_eq!(list_b.as_array().unwrap().len(), 1);
        assert_eq!(list_b[0]["tenant"], "tenant-b");
        // A tenant field in the body is refused: the key names the tenant.
        let (s, _) = api(reqwest::Method::POST, &format!("{}/v1/subscriptions", router.api), KEY_B,
            Some(json!({"tenant": "tenant-a", "criteria": {}, "target": {"type": "live"}}))).await;
        assert_eq!(s, 400);
        assert_eq!(api(reqwest::Method::GET, &a_url, "wrong-key", None).await.0, 401);

        let ba = router.publish("tenant-a", &[("dev", "m", 1.0)]).await;
        let bb = router.publish("tenant-b", &[("dev", "m", 2.0)]).await;
        assert_eq!(hook_a.wait_events(1, Duration::from_secs(10)).await, [reading_id(ba, 0)]);
        assert_eq!(hook_b.wait_events(1, Duration::from_secs(10)).await, [reading_id(bb, 0)]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(hook_a.notifications()[0]["tenant"], "tenant-a");
        assert_eq!(hook_a.event_ids().len(), 1);
        assert_eq!(hook_b.event_ids().len(), 1);
        // Still there: B's DELETE did nothing.
        assert_eq!(api(reqwest::Method::GET, &a_url, KEY_A, None).await.0, 200);
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn webhook_down_for_10s_then_back_receives_everything() {
    with_namespace(|ns| async move {
        // A retry budget longer than the outage: at least (0.5+1+2+3×9)/2 s with jitter.
        let router = Router::start(&ns, |c| {
            c.deliver.max_attempts = 12;
            c.deliver.retry_max = Duration::from_secs(3);
        })
        .await;
        let (hook, url) = Receiver::start().await;
        *hook.down_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(10));
        router
            .subscribe(
                KEY_A,
                json!({"criteria": {}, "target": {"type": "webhook", "url": url}}),
            )
            .await;
        let readings: Vec<(&str, &str, f64)> = (0..20).map(|i| ("w", "m", f64::from(i))).collect();
        let b = router.publish("tenant-a", &readings).await;
        let ids = hook.wait_events(20, Duration::from_secs(40)).await;
        let unique: BTreeSet<String> = ids.iter().cloned().collect();
        let expected: BTreeSet<String> = (0..20).map(|i| reading_id(b, i)).collect();
        assert_eq!(unique, expected, "every notification arrives at least once");
        // Repeats, if any, carry the idempotency key of the first delivery.
        let mut by_key: BTreeMap<String, Value> = BTreeMap::new();
        for (_, headers, n) in hook.got.lock().unwrap().iter() {
            let key = headers["idempotency-key"].to_str().unwrap().to_owned();
            assert_eq!(n["id"].as_str().unwrap(), key);
            if let Some(prev) = by_key.insert(key, n["events"].clone()) {
                assert_eq!(prev, n["events"], "one key, one set of events");
            }
        }
        assert_eq!(by_key.len(), 20);
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn undeliverable_notifications_end_in_the_dead_letter_queue_with_a_reason() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| c.deliver.max_attempts = 3).await;
        let (failing, failing_url) = Receiver::start().await;
        *failing.status.lock().unwrap() = Some(500);
        let (gone, gone_url) = Receiver::start().await;
        *gone.status.lock().unwrap() = Some(404);
        let s1 = router.subscribe(KEY_A, json!({"criteria": {"devices": ["x"]}, "target": {"type": "webhook", "url": failing_url}})).await;
        let s2 = router.subscribe(KEY_A, json!({"criteria": {"devices": ["y"]}, "target": {"type": "webhook", "url": gone_url}})).await;
        router.publish("tenant-a", &[("x", "m", 1.0), ("y", "m", 1.0)]).await;

        let (conn, ch) = amqp::connect().await;
        let mut dead: BTreeMap<String, String> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while dead.len() < 2 && Instant::now() < deadline {
            if let Some(m) = ch.basic_get(format!("{ns}.notify.dead").into(), BasicGetOptions::default()).await.unwrap() {
                let get = |k: &str| amqp::header(&m.delivery.properties, k);
                dead.insert(get("x-sluice-subscription"), get("x-sluice-reason"));
                m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let r1 = &dead[s1["id"].as_str().unwrap()];
        assert!(r1.contains("gave up after 3 attempts") && r1.contains("500"), "{r1}");
        let r2 = &dead[s2["id"].as_str().unwrap()];
        assert!(r2.contains("permanent") && r2.contains("404"), "{r2}");
        let _ = conn.close(200, "done".into()).await;
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_notify_dead_queue_is_bounded() {
    with_namespace(|ns| async move {
        let topology = sluice_binding::Topology {
            dead_letter_max_bytes: 10_000,
            ..sluice_binding::Topology::new(&ns, PARTITIONS)
        };
        let transport = amqp::transport(&topology, "sluice-router-test").await;
        let outbox = Outbox::new(transport.clone(), NOTIFY_PARTITIONS);
        outbox.declare().await.unwrap();
        let (conn, ch) = amqp::connect().await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 0..30 {
            let mut body = format!("{i:08}").into_bytes();
            body.resize(1_000, b'.');
            amqp::publish_confirmed(&ch, "", &outbox.dead_queue(), &body).await;
        }
        let mut kept = Vec::new();
        while let Some(m) = ch
            .basic_get(
                outbox.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            kept.push(
                std::str::from_utf8(&m.delivery.data[..8])
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
        assert_eq!(
            kept,
            (20..30).collect::<Vec<_>>(),
            "the newest 10 of 1 000 bytes kept"
        );
        let _ = conn.close(200, "done".into()).await;
        transport.close().await;
    })
    .await;
}

#[tokio::test]
async fn derived_events_match_by_kind() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let (faults, faults_url) = Receiver::start().await;
        let (readings, readings_url) = Receiver::start().await;
        router.subscribe(KEY_A, json!({"criteria": {"kinds": ["fault"]}, "target": {"type": "webhook", "url": faults_url}})).await;
        router.subscribe(KEY_A, json!({"criteria": {}, "target": {"type": "webhook", "url": readings_url}})).await;
        let ev = DerivedEvent {
            v: FORMAT_VERSION,
            tenant: "tenant-a".into(),
            event: Event {
                id: "fault-1".into(),
                kind: EventKind::Fault,
                device: "s-1".into(),
                metric: "temp".into(),
                t: now_ns(),
                value: Some(999.0),
                detail: Some("spike".into()),
            },
        };
        let outbox = Outbox::new(router.transport.clone(), 2);
        router
            .transport
            .publish_to(&outbox.events_exchange(), "tenant-a.fault", &ev.encode(), BasicProperties::default(), true)
            .await
            .unwrap();
        let b = router.publish("tenant-a", &[("s-1", "temp", 20.0)]).await;
        assert_eq!(faults.wait_events(1, Duration::from_secs(10)).await, ["fault-1"]);
        assert_eq!(faults.notifications()[0]["events"][0]["detail"], "spike");
        assert_eq!(readings.wait_events(1, Duration::from_secs(10)).await, [reading_id(b, 0)]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(faults.event_ids().len(), 1);
        assert_eq!(readings.event_ids().len(), 1);
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| c.webhook.allow.clear()).await;
        let url = format!("{}/v1/subscriptions", router.api);
        for (body, status, code) in [
            (json!({"criteria": {"devices": []}, "target": {"type": "live"}}), 422, "invalid_subscription"),
            (json!({"criteria": {}, "target": {"type": "webhook", "url": "http://127.0.0.1:9/x"}}), 422, "target_refused"),
            (json!({"criteria": {}, "target": {"type": "webhook", "url": "http://169.254.169.254/latest"}}), 422, "target_refused"),
            (json!({"criteria": {}, "target": {"type": "webhook", "url": "http://[::1]/x"}}), 422, "target_refused"),
            (json!({"criteria": {"value": {"above": "hot"}}, "target": {"type": "live"}}), 400, "malformed_body"),
        ] {
            let (s, v) = api(reqwest::Method::POST, &url, KEY_A, Some(body.clone())).await;
            assert_eq!((s, v["error"].as_str().unwrap_or_default()), (status, code), "{body} → {v}");
            assert!(!v["message"].as_str().unwrap_or_default().is_empty());
        }
        // A garbage telemetry message goes to the dead-letter queue with a reason; the
        // router keeps serving.
        let (conn, ch) = amqp::connect().await;
        ch.basic_publish(format!("{ns}.telemetry").into(), "0".into(), BasicPublishOptions::default(), b"not msgpack", BasicProperties::default())
            .await
            .unwrap();
        let m = until(Duration::from_secs(10), || async {
            ch.basic_get(format!("{ns}.dead-letter").into(), BasicGetOptions::default()).await.ok().flatten()
        })
        .await
        .expect("dead-lettered");
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        assert!(matches!(h.inner().get("x-sluice-group"), Some(AMQPValue::LongString(g)) if g.to_string() == "router"));
        assert!(h.inner().contains_key("x-sluice-reason"));
        assert_eq!(api(reqwest::Method::GET, &url, KEY_A, None).await.0, 200);
        let _ = conn.close(200, "done".into()).await;
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_change_reaches_another_instance_within_a_second() {
    with_namespace(|ns| async move {
        let one = Router::start(&ns, |_| {}).await;
        let two = Router::start(&ns, |_| {}).await;
        let (hook, url) = Receiver::start().await;
        let created = Instant::now();
        one.subscribe(
            KEY_A,
            json!({"criteria": {"devices": ["z"]}, "target": {"type": "webhook", "url": url}}),
        )
        .await;
        // Stop the first: from now on only the second matches and delivers.
        one.stop().await;
        let elapsed = created.elapsed();
        if elapsed < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1) - elapsed).await;
        }
        let b = two.publish("tenant-a", &[("z", "m", 1.0)]).await;
        assert_eq!(
            hook.wait_events(1, Duration::from_secs(10)).await,
            [reading_id(b, 0)]
        );
        two.stop().await;
    })
    .await;
}

#[tokio::test]
async fn amqp_targets_reach_only_the_exchanges_granted_to_their_tenant() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |_| {}).await;
        let url = format!("{}/v1/subscriptions", router.api);
        let amqp = |exchange: &str, key: &str| json!({"criteria": {}, "target": {"type": "amqp", "exchange": exchange, "routing_key": key}});
        for (key, body, status, code) in [
            // The default exchange reaches every queue by name: Sluice's own included.
            (KEY_A, json!({"criteria": {}, "target": {"type": "amqp", "routing_key": format!("{ns}.storage.0")}}), 400, "malformed_body"),
            (KEY_A, amqp("", &format!("{ns}.storage.0")), 422, "invalid_subscription"),
            (KEY_A, amqp("amq.topic", "x"), 422, "invalid_subscription"),
            // Granted by the operator, but Sluice's own namespace is never reachable.
            (KEY_A, amqp(&format!("{ns}.telemetry"), "0"), 422, "target_refused"),
            // Another tenant's exchange, and one granted to nobody.
            (KEY_B, amqp(&format!("{ns}-a"), ""), 422, "target_refused"),
            (KEY_A, amqp(&format!("{ns}-b"), ""), 422, "target_refused"),
            (KEY_A, amqp(&format!("{ns}-other"), ""), 422, "target_refused"),
        ] {
            let (s, v) = api(reqwest::Method::POST, &url, key, Some(body.clone())).await;
            assert_eq!((s, v["error"].as_str().unwrap_or_default()), (status, code), "{body} → {v}");
            assert!(v["message"].as_str().unwrap_or_default().contains("exchange"), "{v}");
        }
        let (s, v) = api(reqwest::Method::POST, &url, KEY_A, Some(amqp(&format!("{ns}-a"), "k"))).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(api(reqwest::Method::GET, &url, KEY_A, None).await.1.as_array().map(Vec::len), Some(1));
        router.stop().await;
    })
    .await;
}

/// Tenant A's AMQP target names a granted exchange that does not exist: every publish to
/// it makes the broker close the channel. Tenant B's AMQP and webhook notifications and
/// A's own webhook ones all arrive; A's AMQP notifications take their own retries and end
/// in the dead-letter queue with the broker's reason.
#[tokio::test]
async fn a_target_the_broker_refuses_fails_alone() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| c.deliver.max_attempts = 2).await;
        let (conn, ch) = amqp::connect().await;
        let b_queue = target_exchange(&ch, &format!("{ns}-b")).await;
        let (hook_a, url_a) = Receiver::start().await;
        let (hook_b, url_b) = Receiver::start().await;
        let broken = router
            .subscribe(KEY_A, json!({"criteria": {}, "target": {"type": "amqp", "exchange": format!("{ns}-a-gone")}}))
            .await;
        router.subscribe(KEY_A, json!({"criteria": {}, "target": {"type": "webhook", "url": url_a}})).await;
        router.subscribe(KEY_B, json!({"criteria": {}, "target": {"type": "amqp", "exchange": format!("{ns}-b")}})).await;
        router.subscribe(KEY_B, json!({"criteria": {}, "target": {"type": "webhook", "url": url_b}})).await;

        const ROUNDS: u32 = 20;
        let (mut want_a, mut want_b) = (BTreeSet::new(), BTreeSet::new());
        for i in 0..ROUNDS {
            let a = router.publish("tenant-a", &[("dev", "m", f64::from(i))]).await;
            let b = router.publish("tenant-b", &[("dev", "m", f64::from(i))]).await;
            want_a.insert(reading_id(a, 0));
            want_b.insert(reading_id(b, 0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = ROUNDS as usize;
        let got_a: BTreeSet<String> = hook_a.wait_events(n, Duration::from_secs(20)).await.into_iter().collect();
        let got_b: BTreeSet<String> = hook_b.wait_events(n, Duration::from_secs(20)).await.into_iter().collect();
        assert_eq!(got_a, want_a, "tenant A's webhook");
        assert_eq!(got_b, want_b, "tenant B's webhook");
        let mut amqp_b = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while amqp_b.len() < n && Instant::now() < deadline {
            match ch.basic_get(b_queue.clone().into(), BasicGetOptions::default()).await.unwrap() {
                Some(m) => {
                    let v: Value = serde_json::from_slice(&m.delivery.data).unwrap();
                    amqp_b.extend(ids_of(std::slice::from_ref(&v)));
                    m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(amqp_b, want_b, "tenant B's AMQP target");

        // A's AMQP notifications: dead-lettered after their own attempts, with the reason.
        let mut dead = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while dead.len() < n && Instant::now() < deadline {
            match ch.basic_get(format!("{ns}.notify.dead").into(), BasicGetOptions::default()).await.unwrap() {
                Some(m) => {
                    let get = |k: &str| amqp::header(&m.delivery.properties, k);
                    assert_eq!(get("x-sluice-subscription"), broken["id"].as_str().unwrap());
                    assert_eq!(get("x-sluice-tenant"), "tenant-a");
                    let reason = get("x-sluice-reason");
                    assert!(reason.contains("NOT_FOUND"), "{reason}");
                    let job = Job::decode(&m.delivery.data).expect("a dead letter holds the job");
                    dead.extend(job.events.into_iter().map(|e| e.id));
                    m.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        assert_eq!(dead, want_a, "every AMQP notification of tenant A is dead-lettered, none lost");
        let _ = conn.close(200, "done".into()).await;
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_subscription_api_closes_a_client_trickling_its_headers() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| {
            c.api_limits.header_read_timeout = Duration::from_millis(300);
        })
        .await;
        let addr = router.api.trim_start_matches("http://").to_owned();
        let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"GET /v1/subscriptions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "the connection stayed open: {closed:?}"
        );
        // Other clients are served meanwhile and after.
        let (status, _) = api(
            reqwest::Method::GET,
            &format!("{}/v1/subscriptions", router.api),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, 200);
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_tenant_at_its_live_feed_cap_gets_429_and_another_tenant_is_served() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| c.max_live_feeds_per_tenant = 1).await;
        let live = json!({"criteria": {}, "target": {"type": "live"}});
        let a = router.subscribe(KEY_A, live.clone()).await;
        let b = router.subscribe(KEY_B, live).await;
        let open = |key: &'static str, sub: &Value| {
            let url = format!(
                "{}/v1/subscriptions/{}/live",
                router.api,
                sub["id"].as_str().unwrap()
            );
            async move {
                reqwest::Client::new()
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .unwrap()
            }
        };
        let first = open(KEY_A, &a).await;
        assert_eq!(first.status(), 200);
        let second = open(KEY_A, &a).await;
        assert_eq!(second.status(), 429);
        let body: Value = second.json().await.unwrap();
        assert_eq!(body["error"], "too_many_live_feeds");
        let other = open(KEY_B, &b).await;
        assert_eq!(
            other.status(),
            200,
            "another tenant's feed is not limited by acme's"
        );
        // Closing the first frees its place.
        drop(first);
        let again = until(Duration::from_secs(5), || async {
            let r = open(KEY_A, &a).await;
            (r.status() == 200).then_some(r)
        })
        .await;
        assert!(again.is_some(), "the closed feed's place never came back");
        drop((other, again));
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_creates_never_pass_a_tenant_s_cap() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| c.max_subscriptions_per_tenant = 3).await;
        let url = format!("{}/v1/subscriptions", router.api);
        let body = json!({"criteria": {}, "target": {"type": "live"}});
        let answers = futures::future::join_all(
            (0..12).map(|_| api(reqwest::Method::POST, &url, KEY_A, Some(body.clone()))),
        )
        .await;
        let created = answers.iter().filter(|(s, _)| *s == 201).count();
        let refused = answers.iter().filter(|(s, _)| *s == 409).count();
        assert_eq!((created, refused), (3, 9), "{answers:?}");
        let (status, list) = api(reqwest::Method::GET, &url, KEY_A, None).await;
        assert_eq!(status, 200);
        assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_amqp_notification_no_queue_takes_is_dead_lettered_naming_its_exchange() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| c.deliver.max_attempts = 1).await;
        let (conn, ch) = amqp::connect().await;
        // The granted exchange exists, with no queue bound to it.
        let exchange = format!("{ns}-a");
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
        let sub = router
            .subscribe(
                KEY_A,
                json!({"criteria": {}, "target": {"type": "amqp", "exchange": exchange}}),
            )
            .await;
        router.publish("tenant-a", &[("d", "m", 1.0)]).await;
        let reason = until(Duration::from_secs(30), || async {
            let m = ch
                .basic_get(
                    format!("{ns}.notify.dead").into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()?;
            let p = &m.delivery.properties;
            (amqp::header(p, "x-sluice-subscription") == sub["id"].as_str().unwrap())
                .then(|| amqp::header(p, "x-sluice-reason"))
        })
        .await
        .expect("a dead letter for the subscription");
        assert!(
            reason.contains(&format!("no queue is bound to exchange \"{exchange}\"")),
            "{reason}"
        );
        assert!(!reason.contains("partition"), "{reason}");
        let _ = ch
            .exchange_delete(
                exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = conn.close(200, "done".into()).await;
        router.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_batch_waiting_for_a_day_pins_nothing_on_the_broker_and_outlives_its_router() {
    with_namespace(|ns| async move {
        // Four unsettled jobs per notify queue: forty held jobs would fill it ten times.
        let router = Router::start(&ns, |c| c.deliver.prefetch = 4).await;
        let (long, long_url) = Receiver::start().await;
        let (due, due_url) = Receiver::start().await;
        let (other, other_url) = Receiver::start().await;
        let day = router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["day-*"]}, "policy": {"batch_notify": {"count": 1000, "duration": "24h"}},
                                     "target": {"type": "webhook", "url": long_url}}))
            .await;
        let day_id: Uuid = day["id"].as_str().unwrap().parse().unwrap();
        let soon = router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["soon-*"]}, "policy": {"batch_notify": {"count": 1000, "duration": "3s"}},
                                     "target": {"type": "webhook", "url": due_url}}))
            .await;
        let soon_id: Uuid = soon["id"].as_str().unwrap().parse().unwrap();
        // Tenant B's plain subscription, on the same notify queue as A's day-long batch.
        router
            .subscribe_beside(KEY_B, json!({"criteria": {"devices": ["b-*"]}, "target": {"type": "webhook", "url": other_url}}), day_id)
            .await;

        let mut rc = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let held = |id: Uuid| format!("{ns}:batch:tenant-a:{id}");
        for i in 0..40 {
            router.publish("tenant-a", &[(&format!("day-{i}"), "m", f64::from(i))]).await;
        }
        for i in 0..5 {
            router.publish("tenant-a", &[(&format!("soon-{i}"), "m", f64::from(i))]).await;
        }
        let b = router.publish("tenant-b", &[("b-1", "m", 1.0)]).await;
        assert_eq!(other.wait_events(1, Duration::from_secs(5)).await, [reading_id(b, 0)]);
        // Every job of the batches was acked: their events wait in Redis.
        let lens = until(Duration::from_secs(5), || {
            let mut rc = rc.clone();
            let (d, s) = (held(day_id), held(soon_id));
            async move {
                let dl: usize = redis::cmd("LLEN").arg(&d).query_async(&mut rc).await.unwrap();
                let sl: usize = redis::cmd("LLEN").arg(&s).query_async(&mut rc).await.unwrap();
                (dl == 40 && sl == 5).then_some((dl, sl))
            }
        })
        .await;
        assert_eq!(lens, Some((40, 5)), "the batches' events are held in Redis");
        router.stop().await;

        // Another router (this one is gone) sends the 3 s batch when it is due, in one
        // notification, and leaves the day-long one alone.
        let again = Router::start(&ns, |c| c.deliver.prefetch = 4).await;
        let ids = due.wait_events(5, Duration::from_secs(10)).await;
        assert_eq!(due.notifications().len(), 1, "one notification of five events: {ids:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(long.notifications().is_empty());
        let left: usize = redis::cmd("LLEN").arg(held(soon_id)).query_async(&mut rc).await.unwrap();
        assert_eq!(left, 0, "a sent batch leaves Redis");
        // Deleting the subscription deletes its held batch.
        let url = format!("{}/v1/subscriptions/{day_id}", again.api);
        assert_eq!(api(reqwest::Method::DELETE, &url, KEY_A, None).await.0, 204);
        let left: usize = redis::cmd("LLEN").arg(held(day_id)).query_async(&mut rc).await.unwrap();
        assert_eq!(left, 0);
        again.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_tenant_with_a_slow_webhook_leaves_the_notify_queue_to_the_others() {
    with_namespace(|ns| async move {
        let router = Router::start(&ns, |c| {
            c.deliver.prefetch = 8;
            c.webhook.timeout = Duration::from_secs(10);
        })
        .await;
        let (slow, slow_url) = Receiver::start().await;
        *slow.slow.lock().unwrap() = Some(Duration::from_secs(3));
        let (fast, fast_url) = Receiver::start().await;
        let a = router
            .subscribe(KEY_A, json!({"criteria": {"devices": ["s-*"]}, "target": {"type": "webhook", "url": slow_url}}))
            .await;
        let a_id: Uuid = a["id"].as_str().unwrap().parse().unwrap();
        router
            .subscribe_beside(KEY_B, json!({"criteria": {"devices": ["b-*"]}, "target": {"type": "webhook", "url": fast_url}}), a_id)
            .await;
        // Thirty jobs of A, each waiting 3 s for its answer: without a share, A's eight
        // would fill the queue's prefetch and B's job would wait behind them.
        for i in 0..30 {
            router.publish("tenant-a", &[(&format!("s-{i}"), "m", f64::from(i))]).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = router.publish("tenant-b", &[("b-1", "m", 1.0)]).await;
        assert_eq!(fast.wait_events(1, Duration::from_secs(10)).await, [reading_id(b, 0)]);
        slow.wait_events(1, Duration::from_secs(20)).await;
        let b_at = fast.got.lock().unwrap()[0].0;
        let a_first = slow.got.lock().unwrap().iter().map(|(t, _, _)| *t).min().unwrap();
        assert!(b_at < a_first, "B's notification waited for A's slow webhook");
        // A loses nothing: its deferred jobs come back and are all delivered.
        let ids = slow.wait_events(30, Duration::from_secs(60)).await;
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 30);
        router.stop().await;
    })
    .await;
}
