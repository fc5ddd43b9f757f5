//! The router's subscription API, as loadgen uses it: the body of the run's subscription,
//! and creating and deleting it with the run's API key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::receiver::NOTIFY_PATH;

/// The body of `POST /v1/subscriptions`: every reading of the devices named
/// `{device_prefix}…`, any metric, in batches of up to `batch_count` events held at most
/// `batch_wait`, posted to `url`.
pub fn subscription_body(
    device_prefix: &str,
    batch_count: u32,
    batch_wait: Duration,
    url: &str,
) -> Value {
    json!({
        "name": "loadgen notify latency",
        "criteria": {
            "devices": [format!("{device_prefix}*")],
            "metrics": ["*"],
            "kinds": ["reading"],
        },
        "policy": {
            "batch_notify": {
                "count": batch_count,
                "duration": humantime::format_duration(batch_wait).to_string(),
            },
        },
        "target": {"type": "webhook", "url": url},
    })
}

/// The URL the router reaches the receiver at, by default: the bound address, with an
/// unspecified address (`0.0.0.0`, `::`) replaced by loopback, the usual case of a router
/// on the same host.
pub fn default_notify_url(bound: SocketAddr) -> String {
    let mut addr = bound;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    format!("http://{addr}{NOTIFY_PATH}")
}

/// A client of the router's subscription API, authenticated with one tenant's API key.
#[derive(Debug, Clone)]
pub struct RouterClient {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

/// The router's error body: `{"error": code, "message": text}`.
#[derive(Deserialize)]
struct ApiError {
    error: String,
    message: String,
}

/// The part of the stored subscription loadgen needs.
#[derive(Deserialize)]
struct Created {
    id: String,
}

impl RouterClient {
    /// A client of the router at `base` (`http://127.0.0.1:8090`).
    pub fn new(base: &str, api_key: &str) -> anyhow::Result<Self> {
        // Short timeouts: the API answers from memory and Redis; a router that does not
        // answer should fail the run before it sends, not hang it.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
        })
    }

    /// The router's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Creates a subscription; returns its id. The error names the router's refusal and,
    /// for the usual ones, what to change.
    pub async fn create(&self, body: &Value) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("{}/v1/subscriptions", self.base))
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the router at {} (is `sluice router` running? see --router-url)",
                    self.base
                )
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.as_u16() == 201 {
            let created: Created = serde_json::from_str(&text).with_context(|| {
                format!("the router answered 201 with an unexpected body: {text}")
            })?;
            return Ok(created.id);
        }
        let (code, message) = match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => (e.error, e.message),
            Err(_) => (String::new(), text),
        };
        let hint = match (status.as_u16(), code.as_str()) {
            (422, "target_refused") => {
                "; start the router with --webhook-allow naming loadgen's address (e.g. \
                 --webhook-allow 127.0.0.1), or give --notify-url an address it accepts"
            }
            (401, _) => "; --api-key must be a key the router's tenants file knows",
            (404 | 405, _) => "; is --router-url the router's API (`sluice router --listen`)?",
            _ => "",
        };
        bail!(
            "the router at {} refused the subscription: {status} {code}: {message}{hint}",
            self.base
        )
    }

    /// Deletes subscription `id`; one already gone (404) is not an error.
    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/v1/subscriptions/{id}", self.base))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .with_context(|| format!("cannot reach the router at {}", self.base))?;
        match response.status().as_u16() {
            204 | 404 => Ok(()),
            _ => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                bail!("the router answered {status}: {text}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{delete, post};

    use super::*;

    #[test]
    fn the_body_subscribes_to_the_run_s_devices_with_the_batch_policy() {
        let body = subscription_body(
            "dev-",
            500,
            Duration::from_millis(100),
            "http://127.0.0.1:8099/notify",
        );
        assert_eq!(
            body,
            json!({
                "name": "loadgen notify latency",
                "criteria": {"devices": ["dev-*"], "metrics": ["*"], "kinds": ["reading"]},
                "policy": {"batch_notify": {"count": 500, "duration": "100ms"}},
                "target": {"type": "webhook", "url": "http://127.0.0.1:8099/notify"},
            })
        );
        let slow = subscription_body("x", 1, Duration::from_secs(2), "http://h/notify");
        assert_eq!(slow["policy"]["batch_notify"]["duration"], "2s");
    }

    #[test]
    fn the_default_url_replaces_unspecified_addresses_by_loopback() {
        let url = |a: &str| default_notify_url(a.parse().unwrap());
        assert_eq!(url("0.0.0.0:8099"), "http://127.0.0.1:8099/notify");
        assert_eq!(url("10.1.2.3:8099"), "http://10.1.2.3:8099/notify");
        assert_eq!(url("[::]:8099"), "http://[::1]:8099/notify");
    }

    /// A fake router: 201 for a webhook to `/notify`, the router's 422 otherwise; records
    /// the bodies, auth headers and deletions it saw.
    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<(String, Value)>>>,
        deleted: Arc<Mutex<Vec<String>>>,
    }

    async fn create(
        State(f): State<Fake>,
        headers: HeaderMap,
        axum::Json(body): axum::Json<Value>,
    ) -> (StatusCode, String) {
        let auth = headers["authorization"].to_str().unwrap().to_owned();
        let refused = !body["target"]["url"].as_str().unwrap().ends_with("/notify");
        f.seen.lock().unwrap().push((auth, body));
        if refused {
            let e = json!({"error": "target_refused",
                "message": "target.url: 127.0.0.1 is a loopback address"});
            return (StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
        }
        let sub = json!({"id": "0192f0c4-0000-7000-8000-000000000001", "tenant": "demo"});
        (StatusCode::CREATED, sub.to_string())
    }

    async fn remove(State(f): State<Fake>, Path(id): Path<String>) -> StatusCode {
        f.deleted.lock().unwrap().push(id);
        StatusCode::NO_CONTENT
    }

    async fn fake_router() -> (Fake, String) {
        let fake = Fake::default();
        let app = Router::new()
            .route("/v1/subscriptions", post(create))
            .route("/v1/subscriptions/{id}", delete(remove))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    #[tokio::test]
    async fn create_posts_the_body_with_the_api_key_and_delete_removes_it() {
        let (fake, url) = fake_router().await;
        let client = RouterClient::new(&format!("{url}/"), "k3y").unwrap();
        let body = subscription_body("dev-", 500, Duration::from_millis(100), "http://a/notify");
        let id = client.create(&body).await.unwrap();
        assert_eq!(id, "0192f0c4-0000-7000-8000-000000000001");
        assert_eq!(
            *fake.seen.lock().unwrap(),
            [("Bearer k3y".to_owned(), body)]
        );
        client.delete(&id).await.unwrap();
        assert_eq!(*fake.deleted.lock().unwrap(), [id]);
    }

    #[tokio::test]
    async fn a_refusal_carries_the_router_s_message_and_a_hint() {
        let (_fake, url) = fake_router().await;
        let client = RouterClient::new(&url, "k3y").unwrap();
        let body = subscription_body("dev-", 500, Duration::from_millis(100), "http://a/x");
        let err = format!("{:#}", client.create(&body).await.unwrap_err());
        for want in [
            "refused the subscription",
            "422",
            "target_refused",
            "127.0.0.1 is a loopback address",
            "--webhook-allow",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_router_is_named() {
        // Bound, then closed: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = RouterClient::new(&format!("http://{addr}"), "k").unwrap();
        let body = subscription_body("dev-", 1, Duration::from_secs(1), "http://a/notify");
        let err = format!("{:#}", client.create(&body).await.unwrap_err());
        assert!(err.contains("cannot reach the router"), "{err}");
        assert!(err.contains(&addr.to_string()), "{err}");
    }
}
