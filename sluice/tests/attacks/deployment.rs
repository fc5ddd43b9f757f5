//! The deployment under attack and the attacker's and victim's tools.
//!
//! Two tenants in one tenants file: `acme`, the victim, with a full key, a webhook and an
//! AMQP subscription of its own; `mallory`, the attacker, with a full key, a device key
//! (`ingest` scope only), a quota, two granted exchanges (one never declared) and a broker
//! user with the permissions docs/binding.md §6 gives a direct publisher. Every service
//! runs with its limits lowered so that a probe reaches them in seconds.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use sluice_binding::model::now_ns;
use sluice_testkit::amqp::{self, BrokerUser};
use sluice_testkit::store;
use sluice_testkit::wait::until;

use crate::support::broker::*;
use crate::support::*;

pub(crate) const ACME: &str = "acme-key";
pub(crate) const MALLORY: &str = "mallory-key";
/// Mallory's key with the `ingest` scope only, as a device would hold it.
pub(crate) const MALLORY_DEVICE: &str = "mallory-device-key";
/// Mallory's quota, readings per second (a request of more is 413).
pub(crate) const MALLORY_QUOTA: u64 = 4000;
/// Bytes mallory's ingress queue holds before the broker nacks its direct publishes.
pub(crate) const GATE_BACKLOG_BYTES: u64 = 64 * 1024;
/// Ingest's in-flight requests; each tenant holds at most half.
pub(crate) const INGEST_INFLIGHT: usize = 64;
/// Ingest's and the router's header and body read timeouts.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The storage pool's latest-value series per tenant.
pub(crate) const MAX_SERIES: usize = 200;

/// A dead letter: `x-sluice-error`, `x-sluice-reason`, `x-sluice-group`, body.
#[derive(Clone, Debug)]
pub(crate) struct DeadLetter {
    pub kind: String,
    pub reason: String,
    pub group: String,
    pub body: Vec<u8>,
}

/// The running deployment.
pub(crate) struct Deployment {
    pub w: World,
    pub mallory_user: BrokerUser,
    pub ingest: String,
    pub router: String,
    pub query: String,
    /// What acme's webhook received.
    pub acme_hook: Notified,
    /// The queue bound to acme's granted exchange (its AMQP subscription's target).
    pub acme_inbox: String,
    /// Mallory's granted exchange that was never declared (the other one is).
    pub mallory_missing_exchange: String,
    /// acme's own granted exchange.
    pub acme_exchange: String,
    /// A loopback port that counts every connection made to it (SSRF probes aim there).
    pub canary_port: u16,
    pub canary_hits: Arc<AtomicUsize>,
    /// Readings each tenant was answered 202 for.
    pub acme_accepted: AtomicU64,
    pub mallory_accepted: AtomicU64,
    pub client: reqwest::Client,
    dead: Mutex<Vec<DeadLetter>>,
    procs: Mutex<Vec<Proc>>,
}

impl Deployment {
    pub(crate) fn start() -> Self {
        let w = World::new();
        let ns = w.ns.name().to_owned();
        let mallory_user = BrokerUser::create("mallory-gw");
        // docs/binding.md §6: mallory has a quota, so its user writes its ingress exchange
        // and the events exchange. Wider than documented on purpose, the telemetry exchange
        // too: what it publishes there went around its quota, and every consumer refuses it.
        let write = format!(
            "^{}\\.(telemetry|events|ingress\\.mallory)$",
            regex_escape(&ns)
        );
        let t = w.ns.topology();
        w.ns.add_queue(t.ingress_queue("mallory"));
        w.ns.add_exchange(t.ingress_exchange("mallory"));
        let out = Command::new("rabbitmqctl")
            .args([
                "set_permissions",
                "-p",
                "/",
                mallory_user.name(),
                "^$",
                &write,
                "^$",
            ])
            .output()
            .expect("rabbitmqctl");
        assert!(out.status.success(), "{out:?}");

        let acme_exchange = format!("acme-{ns}.alerts");
        let acme_inbox = format!("acme-{ns}.inbox");
        let mallory_exchange = format!("mallory-{ns}.alerts");
        let mallory_missing_exchange = format!("mallory-{ns}.missing");
        std::fs::write(
            &w.tenants,
            format!(
                "[[tenant]]\nid = \"acme\"\napi_keys = [\"{ACME}\"]\namqp_exchanges = [\"{acme_exchange}\"]\n\n\
                 [[tenant]]\nid = \"mallory\"\n\
                 api_keys = [\"{MALLORY}\", {{ key = \"{MALLORY_DEVICE}\", scopes = [\"ingest\"] }}]\n\
                 amqp_exchanges = [\"{mallory_exchange}\", \"{mallory_missing_exchange}\"]\n\
                 amqp_users = [\"{}\"]\n\
                 quota = {{ readings_per_sec = {MALLORY_QUOTA}, bytes_per_sec = 4000000 }}\n",
                mallory_user.name()
            ),
        )
        .unwrap();
        rt().block_on(async {
            let (conn, ch) = amqp::connect().await;
            for x in [&acme_exchange, &mallory_exchange] {
                ch.exchange_declare(
                    x.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
                w.ns.add_exchange(x.clone());
            }
            ch.queue_declare(
                acme_inbox.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            w.ns.add_queue(acme_inbox.clone());
            ch.queue_bind(
                acme_inbox.as_str().into(),
                acme_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            let _ = conn.close(200, "done".into()).await;
        });

        let tenants = w.tenants.to_str().unwrap().to_owned();
        let timeout = format!("{}s", READ_TIMEOUT.as_secs());
        let mut procs = vec![w.processors_with(&[
            ("SLUICE_TENANTS", &tenants),
            ("SLUICE_MAX_LATEST_SERIES", &MAX_SERIES.to_string()),
        ])];
        let (ingest, ingest_url) = w.ingest(&[
            ("SLUICE_MAX_INFLIGHT_REQUESTS", &INGEST_INFLIGHT.to_string()),
            ("SLUICE_BODY_READ_TIMEOUT", &timeout),
            ("SLUICE_HEADER_READ_TIMEOUT", &timeout),
            ("SLUICE_MAX_CONNECTIONS", "512"),
            // Mallory's ingress queue holds a few batches; its flood is nacked past them.
            (
                "SLUICE_GATE_MAX_BACKLOG_BYTES",
                &GATE_BACKLOG_BYTES.to_string(),
            ),
        ]);
        procs.push(ingest);
        let router_port = free_port();
        procs.push(w.router_with(
            router_port,
            &[
                // acme's webhook is on loopback under this name; every other way to
                // loopback stays refused.
                ("SLUICE_WEBHOOK_ALLOW", "localhost"),
                ("SLUICE_NOTIFY_PREFETCH", "8"),
                ("SLUICE_NOTIFY_MAX_ATTEMPTS", "2"),
                ("SLUICE_NOTIFY_RETRY_INITIAL", "200ms"),
                ("SLUICE_ROUTER_HEADER_READ_TIMEOUT", &timeout),
            ],
        ));
        let query_port = free_port();
        let mut cmd = Command::new(sluice_bin());
        w.common(&mut cmd);
        cmd.arg("query-api")
            .env("SLUICE_LISTEN", format!("127.0.0.1:{query_port}"))
            .env("SLUICE_TENANTS", &w.tenants)
            .env("SLUICE_STORE", w.data())
            .env("SLUICE_REDIS_URL", redis_url())
            .env("SLUICE_REDIS_PREFIX", w.ns.name())
            .env("SLUICE_QUERY_TIMEOUT", "5s");
        procs.push(Proc::spawn("query-api", &mut cmd));
        let query = format!("http://127.0.0.1:{query_port}");
        let http = Http::new();
        wait_until("query-api /readyz", Duration::from_secs(30), || {
            http.ready(&format!("{query}/readyz"))
        });

        let (hook, acme_hook) = webhook_receiver();
        let hook = hook.replace("127.0.0.1", "localhost");
        let (canary_port, canary_hits) = canary();
        let d = Deployment {
            w,
            mallory_user,
            ingest: ingest_url,
            router: format!("http://127.0.0.1:{router_port}"),
            query,
            acme_hook,
            acme_inbox,
            mallory_missing_exchange,
            acme_exchange,
            canary_port,
            canary_hits,
            acme_accepted: AtomicU64::new(0),
            mallory_accepted: AtomicU64::new(0),
            client: reqwest::Client::new(),
            dead: Mutex::new(Vec::new()),
            procs: Mutex::new(procs),
        };
        // acme's subscriptions: every reading to its webhook, and to its exchange.
        http.rt.block_on(async {
            let (s, b) = d
                .subscribe(
                    ACME,
                    json!({"criteria": {}, "target": {"type": "webhook", "url": hook}}),
                )
                .await;
            assert_eq!(s, 201, "{b}");
            let (s, b) = d
                .subscribe(
                    ACME,
                    json!({"criteria": {"devices": ["acme-amqp-*"]},
                           "target": {"type": "amqp", "exchange": d.acme_exchange}}),
                )
                .await;
            assert_eq!(s, 201, "{b}");
        });
        d
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.w.data()
    }

    /// Panics unless every service still runs.
    pub(crate) fn all_running(&self) {
        let mut procs = self.procs.lock().unwrap();
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("{} exited: {status}", p.name);
            }
        }
    }

    /// `POST /v1/telemetry` of a JSON body; `(status, body, Retry-After)`.
    pub(crate) async fn post(&self, key: &str, body: &Value) -> (u16, Value, Option<String>) {
        self.post_raw(key, "application/json", body.to_string().into_bytes())
            .await
    }

    pub(crate) async fn post_raw(
        &self,
        key: &str,
        ctype: &str,
        body: Vec<u8>,
    ) -> (u16, Value, Option<String>) {
        let resp = self
            .client
            .post(format!("{}/v1/telemetry", self.ingest))
            .bearer_auth(key)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .expect("ingest answers");
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            retry,
        )
    }

    /// `n` readings of `device` (metric `m`, timestamps now, values 0..n) as acme; panics
    /// unless they are accepted.
    pub(crate) async fn acme_sends(&self, device: &str, n: usize) {
        let body = readings(device, n, now_ns());
        let (status, b, _) = self.post(ACME, &body).await;
        assert_eq!(status, 202, "acme's own readings: {b}");
        self.acme_accepted.fetch_add(n as u64, Ordering::SeqCst);
    }

    /// Like [`Self::acme_sends`], as mallory; the status (202 counts them as mallory's).
    pub(crate) async fn mallory_sends(&self, device: &str, n: usize) -> u16 {
        let body = readings(device, n, now_ns());
        let (status, _, _) = self.post(MALLORY, &body).await;
        if status == 202 {
            self.mallory_accepted.fetch_add(n as u64, Ordering::SeqCst);
        }
        status
    }

    /// Waits until acme's webhook got a reading of `device`; panics after `within`.
    pub(crate) async fn acme_notified(&self, device: &str, within: Duration) {
        let got = until(within, || async {
            self.acme_hook
                .lock()
                .unwrap()
                .iter()
                .any(|e| e["device"] == device)
                .then_some(())
        })
        .await;
        assert!(
            got.is_some(),
            "acme's webhook got no notification of {device} within {within:?}"
        );
    }

    /// Waits until acme's table holds `n` rows of `device`.
    pub(crate) async fn acme_stored(&self, device: &str, n: u64, within: Duration) {
        let sql = format!("SELECT count(*) FROM readings WHERE device = '{device}'");
        let got = until(within, || async {
            (store::count(&self.data(), "acme", &sql).await >= n).then_some(())
        })
        .await;
        assert!(
            got.is_some(),
            "{n} rows of acme's {device} within {within:?}"
        );
    }

    pub(crate) async fn rows(&self, tenant: &str, sql: &str) -> u64 {
        store::count(&self.data(), tenant, sql).await
    }

    /// A subscription request; `(status, body)`.
    pub(crate) async fn subscribe(&self, key: &str, sub: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/v1/subscriptions", self.router))
            .bearer_auth(key)
            .json(&sub)
            .send()
            .await
            .expect("the router answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A request to the router's API (`GET`, `DELETE`); `(status, body)`.
    pub(crate) async fn router_call(
        &self,
        method: reqwest::Method,
        key: &str,
        path: &str,
    ) -> (u16, Value) {
        let resp = self
            .client
            .request(method, format!("{}{path}", self.router))
            .bearer_auth(key)
            .send()
            .await
            .expect("the router answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/query`; `(status, body)`.
    pub(crate) async fn sql(&self, key: &str, sql: &str) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/v1/query", self.query))
            .bearer_auth(key)
            .header("content-type", "application/sql")
            .body(sql.to_owned())
            .send()
            .await
            .expect("the query API answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET /v1/latest{query}`; `(status, body)`.
    pub(crate) async fn latest(&self, key: &str, query: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}/v1/latest{query}", self.query))
            .bearer_auth(key)
            .send()
            .await
            .expect("the query API answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Publishes `body` as mallory's broker user, with confirms; `user_id` as given (the
    /// broker refuses one that is not the connection's user). `Err` when the broker refused
    /// (a closed channel, a nack).
    pub(crate) async fn publish_as_mallory(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        user_id: Option<&str>,
    ) -> Result<(), String> {
        let conn = Connection::connect(&self.mallory_user.url(), ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string())?;
        let result = async {
            let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut props = BasicProperties::default().with_delivery_mode(2);
            if let Some(u) = user_id {
                props = props.with_user_id(u.into());
            }
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            if confirm.is_ack() {
                Ok(())
            } else {
                Err(format!("not acked: {confirm:?}"))
            }
        }
        .await;
        let _ = conn.close(200, "done".into()).await;
        result
    }

    /// Waits until a dead letter in the namespace's dead-letter queue satisfies `pred`;
    /// dead letters read so far are kept, so each probe sees every one.
    pub(crate) async fn dead_letter(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&DeadLetter) -> bool,
    ) -> DeadLetter {
        let queue = self.w.ns.topology().dead_letter_queue();
        let (conn, ch) = amqp::connect().await;
        let found = until(within, || async {
            while let Some(m) = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                let p = &m.delivery.properties;
                let header = |k: &str| match p.headers().as_ref().and_then(|h| h.inner().get(k)) {
                    Some(AMQPValue::LongString(s)) => s.to_string(),
                    _ => String::new(),
                };
                self.dead.lock().unwrap().push(DeadLetter {
                    kind: header("x-sluice-error"),
                    reason: header("x-sluice-reason"),
                    group: header("x-sluice-group"),
                    body: m.delivery.data.clone(),
                });
            }
            self.dead.lock().unwrap().iter().find(|d| pred(d)).cloned()
        })
        .await;
        let _ = conn.close(200, "done".into()).await;
        found.unwrap_or_else(|| {
            panic!(
                "no dead letter {what} within {within:?}; got {:?}",
                self.dead
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|d| (&d.kind, &d.group, &d.reason))
                    .collect::<Vec<_>>()
            )
        })
    }

    /// Messages ready in `queue`, counted by the broker.
    pub(crate) async fn ready(&self, queue: &str) -> u32 {
        let (conn, _) = amqp::connect().await;
        let n = amqp::ready(&conn, queue).await.unwrap_or(0);
        let _ = conn.close(200, "done".into()).await;
        n
    }

    /// The final check: acme's table holds exactly the readings acme was answered 202 for,
    /// each once; mallory's holds exactly its own; acme's webhook got acme's devices only;
    /// every service still runs.
    pub(crate) async fn acme_holds_only_its_own(&self) {
        self.all_running();
        for (tenant, accepted, prefix) in [
            ("acme", &self.acme_accepted, "acme-"),
            ("mallory", &self.mallory_accepted, "m-"),
        ] {
            let want = accepted.load(Ordering::SeqCst);
            let got = until(Duration::from_secs(60), || async {
                let n = self.rows(tenant, "SELECT count(*) FROM readings").await;
                (n >= want).then_some(n)
            })
            .await;
            // A moment more, so that a late extra row would show.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = self.rows(tenant, "SELECT count(*) FROM readings").await;
            assert!(
                got.is_some(),
                "{tenant}: {n} rows stored of {want} accepted"
            );
            assert_eq!(n, want, "{tenant}: rows stored = readings accepted");
            let distinct = self
                .rows(
                    tenant,
                    "SELECT count(*) FROM (SELECT DISTINCT device, metric, ts FROM readings)",
                )
                .await;
            assert_eq!(distinct, want, "{tenant}: each reading once");
            let foreign = self
                .rows(
                    tenant,
                    &format!("SELECT count(*) FROM readings WHERE device NOT LIKE '{prefix}%'"),
                )
                .await;
            assert_eq!(foreign, 0, "{tenant}'s table holds another's devices");
        }
        let devices: BTreeSet<String> = self
            .acme_hook
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["device"].as_str().unwrap_or("").to_owned())
            .collect();
        assert!(!devices.is_empty(), "acme's webhook got nothing at all");
        let foreign: Vec<_> = devices.iter().filter(|d| !d.starts_with("acme-")).collect();
        assert!(foreign.is_empty(), "acme was notified of {foreign:?}");
    }
}

/// `{"readings": [...]}`: `n` readings of `device`, metric `m`, one a millisecond from `t0`.
pub(crate) fn readings(device: &str, n: usize, t0: i64) -> Value {
    let r: Vec<Value> = (0..n)
        .map(|i| json!({"device": device, "metric": "m", "ts": t0 + i as i64 * 1_000_000, "value": i as f64}))
        .collect();
    json!({ "readings": r })
}

/// A listener on loopback that accepts and counts connections: if a probe's request ever
/// reaches it, the defence failed.
fn canary() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            h.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (port, hits)
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".^$*+?()[]{}|\\".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}
