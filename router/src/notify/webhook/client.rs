//! The HTTP client of the webhook notifier: one connection pool, and per tenant and target
//! (scheme, host and port) a concurrency limit and a circuit breaker. Per tenant, because
//! tenants may post to different paths of one shared host: one tenant's failing endpoint
//! must not open the circuit, nor take the slots, of another tenant's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Url, redirect};
use tokio::sync::Semaphore;

use super::WebhookConfig;
use super::address::{AddressRules, GuardedResolver, refused_address, refused_host};
use super::breaker::{Breaker, Health};
use super::outcome::{
    WebhookError, classify_error, classify_status, permanent, retry_after, retryable,
};
use crate::internal_events::{WebhookAttempted, WebhookCircuitChanged};

/// Most bytes of a response body read (for the reason of a failure); the rest is dropped
/// unread, so a subscriber cannot make us download a large body.
const BODY_CAP: usize = 512;
/// Above this many targets in the map, idle ones are dropped when a new one is added.
const PRUNE_ABOVE: usize = 4096;

/// A webhook URL, parsed and checked for shape.
#[derive(Debug)]
struct WebhookUrl {
    url: Url,
    /// Host name or address, without the brackets of an IPv6 address.
    host: String,
    /// Set when the host is an address literal (which the resolver never sees).
    ip: Option<IpAddr>,
    port: u16,
    /// `scheme://host:port`: the unit of concurrency limits and circuit breakers.
    target: String,
}

impl WebhookUrl {
    fn parse(raw: &str) -> Result<Self, WebhookError> {
        let url = Url::parse(raw).map_err(|e| permanent(format!("invalid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(permanent(format!(
                "unsupported URL scheme {:?}: expected http or https",
                url.scheme()
            )));
        }
        let host_port = match (url.host_str(), url.port_or_known_default()) {
            (Some(h), Some(p)) if !h.is_empty() => Some((h.to_owned(), p)),
            _ => None,
        };
        let Some((host_str, port)) = host_port else {
            return Err(permanent("invalid URL: no host"));
        };
        let target = format!("{}://{host_str}:{port}", url.scheme());
        // The URL parser has already normalized address literals (`0x7f.1` → `127.0.0.1`).
        let host = host_str
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host_str)
            .to_owned();
        let ip = host.parse().ok();
        Ok(WebhookUrl {
            url,
            host,
            ip,
            port,
            target,
        })
    }
}

/// Sends webhook notifications. Cheap to clone (the state is shared).
#[derive(Clone, Debug)]
pub struct WebhookNotifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    cfg: WebhookConfig,
    rules: Arc<AddressRules>,
    targets: Mutex<HashMap<String, Arc<TargetState>>>,
}

/// What the notifier keeps per target.
#[derive(Debug)]
struct TargetState {
    slots: Semaphore,
    breaker: Mutex<Breaker>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data guarded here stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WebhookNotifier {
    /// A notifier with its own HTTP client (connection pool).
    pub fn new(cfg: WebhookConfig) -> Result<Self, reqwest::Error> {
        let rules = Arc::new(AddressRules::new(&cfg.allow));
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            // A redirect would send the request to a URL nobody checked.
            .redirect(redirect::Policy::none())
            // A proxy would connect on our behalf, past the address rules.
            .no_proxy()
            .dns_resolver(GuardedResolver {
                rules: Arc::clone(&rules),
            })
            .user_agent(concat!("sluice-webhook/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(WebhookNotifier {
            inner: Arc::new(Inner {
                client,
                cfg,
                rules,
                targets: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Checks a URL against the address rules without sending (when a subscription is
    /// created): scheme http or https, a host, and no refused address: loopback, private
    /// (RFC 1918), shared (CGNAT 100.64.0.0/10), link-local (169.254.0.0/16 with the
    /// cloud metadata address, fe80::/10), unique-local (fc00::/7), unspecified,
    /// broadcast, multicast, 192.0.0.0/24, benchmarking (198.18.0.0/15), reserved
    /// (240.0.0.0/4), or the IPv4-mapped, NAT64, 6to4 or IPv4-compatible form of one,
    /// unless allow-listed. A host name is resolved now, and refused if any of its
    /// addresses is (when sending, the refused ones are only skipped); an allow-listed
    /// name may resolve to internal networks only. Errors are [`WebhookError::Permanent`].
    pub async fn check_target(&self, url: &str) -> Result<(), WebhookError> {
        let url = WebhookUrl::parse(url)?;
        let rules = &self.inner.rules;
        if let Some(ip) = url.ip {
            return match rules.refusal(ip) {
                Some(class) => Err(permanent(refused_address(ip, class))),
                None => Ok(()),
            };
        }
        let host = &url.host;
        let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), url.port))
            .await
            .map_err(|e| permanent(format!("cannot resolve {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(permanent(format!("{host} resolves to no address")));
        }
        for addr in addrs {
            if let Some(class) = rules.refusal_for(host, addr.ip()) {
                return Err(permanent(refused_host(host, addr.ip(), class)));
            }
        }
        Ok(())
    }

    /// POSTs `body` (serialized JSON) to `url` with the headers `Content-Type:
    /// application/json`, `Idempotency-Key: {key}` and `X-Sluice-Subscription:
    /// {subscription}`. Any 2xx response is a success; redirects are not followed.
    /// `tenant` owns the subscription: slots and circuit breakers are the tenant's own.
    pub async fn send(
        &self,
        tenant: &str,
        url: &str,
        subscription: &str,
        key: &str,
        body: Bytes,
    ) -> Result<(), WebhookError> {
        let (host, result, elapsed) = match WebhookUrl::parse(url) {
            Ok(url) => {
                let (result, elapsed) = self.send_to(tenant, &url, subscription, key, body).await;
                (url.host, result, elapsed)
            }
            Err(e) => (String::new(), Err(e), None),
        };
        WebhookAttempted {
            host: &host,
            subscription,
            result: &result,
            elapsed,
        }
        .emit();
        result
    }

    /// One attempt; the duration of the HTTP exchange if there was one.
    async fn send_to(
        &self,
        tenant: &str,
        url: &WebhookUrl,
        subscription: &str,
        key: &str,
        body: Bytes,
    ) -> (Result<(), WebhookError>, Option<Duration>) {
        let cfg = &self.inner.cfg;
        // Address literals never reach the resolver.
        if let Some(ip) = url.ip
            && let Some(class) = self.inner.rules.refusal(ip)
        {
            return (Err(permanent(refused_address(ip, class))), None);
        }
        let target = self.target(tenant, &url.target);
        if let Err(retry_in) = lock(&target.breaker).admit(Instant::now()) {
            let e = WebhookError::CircuitOpen {
                target: url.target.clone(),
                retry_in,
            };
            return (Err(e), None);
        }
        // Waiting for a slot is back pressure, bounded so a stuck target cannot hold its
        // callers forever.
        let slot = tokio::time::timeout(cfg.timeout, target.slots.acquire()).await;
        let Ok(Ok(_slot)) = slot else {
            self.record(&target, &url.host, Health::Unknown);
            let e = retryable(format!(
                "per-target concurrency limit: waited {} for one of the {} slots of {}",
                humantime::format_duration(cfg.timeout),
                cfg.per_target_concurrency.max(1),
                url.target
            ));
            return (Err(e), None);
        };
        let started = Instant::now();
        let (result, health) = self
            .exchange(url.url.clone(), subscription, key, body)
            .await;
        let elapsed = started.elapsed();
        self.record(&target, &url.host, health);
        (result, Some(elapsed))
    }

    /// The HTTP request and the classification of its outcome.
    async fn exchange(
        &self,
        url: Url,
        subscription: &str,
        key: &str,
        body: Bytes,
    ) -> (Result<(), WebhookError>, Health) {
        let sent = self
            .inner
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .header("x-sluice-subscription", subscription)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return classify_error(e, self.inner.cfg.timeout),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // Read a little even on success, so a short body leaves the connection reusable.
        let snippet = read_capped(&mut response, BODY_CAP).await;
        classify_status(status, retry_after, &snippet)
    }

    /// The state of `tenant`'s use of a target, created on first use.
    fn target(&self, tenant: &str, target: &str) -> Arc<TargetState> {
        let key = format!("{tenant} {target}");
        let mut targets = lock(&self.inner.targets);
        if let Some(t) = targets.get(&key) {
            return Arc::clone(t);
        }
        if targets.len() >= PRUNE_ABOVE {
            // Forget targets that are not in use and have nothing to remember.
            targets.retain(|_, t| Arc::strong_count(t) > 1 || !lock(&t.breaker).is_idle());
        }
        let cfg = &self.inner.cfg;
        let t = Arc::new(TargetState {
            slots: Semaphore::new(cfg.per_target_concurrency.max(1)),
            breaker: Mutex::new(Breaker::new(
                cfg.breaker_failures,
                cfg.breaker_open_for,
                // Slot wait plus request.
                cfg.timeout.saturating_mul(2),
            )),
        });
        targets.insert(key, Arc::clone(&t));
        t
    }

    fn record(&self, target: &TargetState, host: &str, health: Health) {
        let transition = lock(&target.breaker).record(Instant::now(), health);
        if let Some(transition) = transition {
            WebhookCircuitChanged {
                host,
                transition,
                open_for: self.inner.cfg.breaker_open_for,
            }
            .emit();
        }
    }
}

/// Up to `cap` bytes of the body, as text on one line; read errors end it early.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk[..chunk.len().min(cap - buf.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus};
    use axum::routing::post;

    use super::*;
    use crate::notify::webhook::AllowRule;

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap()
    }

    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    fn local(cfg: WebhookConfig) -> WebhookNotifier {
        WebhookNotifier::new(WebhookConfig {
            allow: vec![rule("127.0.0.1")],
            ..cfg
        })
        .unwrap()
    }

    async fn send(n: &WebhookNotifier, url: &str) -> Result<(), WebhookError> {
        send_as(n, "t1", url).await
    }

    async fn send_as(n: &WebhookNotifier, tenant: &str, url: &str) -> Result<(), WebhookError> {
        n.send(
            tenant,
            url,
            "sub-1",
            "key-1",
            Bytes::from_static(b"{\"a\":1}"),
        )
        .await
    }

    /// A server answering every POST with `status`, `headers` and `body`; counts hits.
    async fn answering(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: &'static str,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let app = Router::new().route(
            "/hook",
            post(move || async move {
                h.fetch_add(1, Ordering::SeqCst);
                let mut map = AxumHeaders::new();
                for (k, v) in headers {
                    map.insert(*k, v.parse().unwrap());
                }
                (AxumStatus::from_u16(status).unwrap(), map, body)
            }),
        );
        (serve(app).await, hits)
    }

    #[tokio::test]
    async fn delivers_with_headers() {
        let seen = Arc::new(Mutex::new(None));
        let s = Arc::clone(&seen);
        let app = Router::new().route(
            "/hook",
            post(move |headers: AxumHeaders, body: Bytes| async move {
                *lock(&s) = Some((headers, body));
                AxumStatus::ACCEPTED
            }),
        );
        let addr = serve(app).await;
        let n = local(WebhookConfig::default());
        n.check_target(&format!("http://{addr}/hook"))
            .await
            .unwrap();
        send(&n, &format!("http://{addr}/hook")).await.unwrap();
        let (headers, body) = lock(&seen).take().unwrap();
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["idempotency-key"], "key-1");
        assert_eq!(headers["x-sluice-subscription"], "sub-1");
        assert_eq!(&body[..], b"{\"a\":1}");
    }

    #[tokio::test]
    async fn server_error_is_retryable() {
        let (addr, _) = answering(500, &[], "database down").await;
        let n = local(WebhookConfig::default());
        match send(&n, &format!("http://{addr}/hook")).await {
            Err(WebhookError::Retryable {
                reason,
                retry_after: None,
            }) => assert_eq!(reason, "HTTP 500 Internal Server Error: database down"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn not_found_is_permanent() {
        let (addr, _) = answering(404, &[], "").await;
        let n = local(WebhookConfig::default());
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert_eq!(e.reason(), "HTTP 404 Not Found");
    }

    #[tokio::test]
    async fn too_many_requests_carries_retry_after() {
        let (addr, _) = answering(429, &[("retry-after", "7")], "slow down").await;
        let n = local(WebhookConfig::default());
        match send(&n, &format!("http://{addr}/hook")).await {
            Err(WebhookError::Retryable { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn redirect_is_not_followed() {
        let (addr, _) = answering(302, &[("location", "http://169.254.169.254/")], "").await;
        let n = local(WebhookConfig::default());
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert!(e.reason().contains("redirects are not followed"), "{e}");
    }

    #[tokio::test]
    async fn large_body_is_not_read_beyond_the_cap() {
        let body: &'static str = "x".repeat(100_000).leak();
        let (addr, _) = answering(400, &[], body).await;
        let n = local(WebhookConfig::default());
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert_eq!(e.reason().len(), "HTTP 400 Bad Request: ".len() + BODY_CAP);
    }

    #[tokio::test]
    async fn slow_server_times_out_as_retryable() {
        let app = Router::new().route(
            "/hook",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                AxumStatus::OK
            }),
        );
        let addr = serve(app).await;
        let n = local(WebhookConfig {
            timeout: Duration::from_millis(200),
            ..WebhookConfig::default()
        });
        let started = Instant::now();
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        match e {
            WebhookError::Retryable { reason, .. } => {
                assert!(reason.starts_with("timed out"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        // Bind then drop: a port nobody listens on.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let n = local(WebhookConfig::default());
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert!(matches!(e, WebhookError::Retryable { .. }), "{e:?}");
        assert!(!e.reason().contains("/hook"), "no URL in the reason: {e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_target_concurrency_limit_holds() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let (i, m) = (Arc::clone(&in_flight), Arc::clone(&max_seen));
        let app = Router::new().route(
            "/hook",
            post(move || {
                let (i, m) = (Arc::clone(&i), Arc::clone(&m));
                async move {
                    let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    i.fetch_sub(1, Ordering::SeqCst);
                    AxumStatus::NO_CONTENT
                }
            }),
        );
        let addr = serve(app).await;
        let n = local(WebhookConfig {
            per_target_concurrency: 3,
            ..WebhookConfig::default()
        });
        let url = format!("http://{addr}/hook");
        let results = futures::future::join_all((0..20).map(|_| {
            let (n, url) = (n.clone(), url.clone());
            tokio::spawn(async move { send(&n, &url).await })
        }))
        .await;
        for r in results {
            r.unwrap().unwrap();
        }
        let max = max_seen.load(Ordering::SeqCst);
        assert!((1..=3).contains(&max), "max concurrent {max}");
    }

    #[tokio::test]
    async fn waiting_for_a_slot_is_bounded() {
        let (addr, hits) = answering(200, &[], "").await;
        let n = local(WebhookConfig {
            per_target_concurrency: 1,
            timeout: Duration::from_millis(100),
            ..WebhookConfig::default()
        });
        let target = n.target("t1", &format!("http://{addr}"));
        let _held = target.slots.acquire().await.unwrap();
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert!(matches!(e, WebhookError::Retryable { .. }), "{e:?}");
        assert!(
            e.reason()
                .starts_with("per-target concurrency limit: waited 100ms"),
            "{e}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        // Back pressure is not a failure of the target.
        assert!(lock(&target.breaker).is_idle());
    }

    #[tokio::test]
    async fn circuit_opens_then_skips_the_target() {
        let (addr, hits) = answering(503, &[], "").await;
        let n = local(WebhookConfig {
            breaker_failures: 2,
            ..WebhookConfig::default()
        });
        let url = format!("http://{addr}/hook");
        for _ in 0..2 {
            assert!(matches!(
                send(&n, &url).await,
                Err(WebhookError::Retryable { .. })
            ));
        }
        match send(&n, &url).await {
            Err(WebhookError::CircuitOpen { target, retry_in }) => {
                assert_eq!(target, format!("http://{addr}"));
                assert!(retry_in > Duration::from_secs(29) && retry_in <= Duration::from_secs(30));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn one_tenant_s_open_circuit_leaves_another_tenant_on_the_same_host_alone() {
        let (addr, hits) = answering(503, &[], "").await;
        let n = local(WebhookConfig {
            breaker_failures: 1,
            ..WebhookConfig::default()
        });
        let url = format!("http://{addr}/hook");
        assert!(send_as(&n, "a", &url).await.is_err());
        assert!(matches!(
            send_as(&n, "a", &url).await,
            Err(WebhookError::CircuitOpen { .. })
        ));
        // Tenant b's request to the same host still goes out (and fails on its own).
        let b = send_as(&n, "b", &url).await;
        assert!(matches!(b, Err(WebhookError::Retryable { .. })), "{b:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn permanent_failures_do_not_open_the_circuit() {
        let (addr, hits) = answering(400, &[], "").await;
        let n = local(WebhookConfig {
            breaker_failures: 1,
            ..WebhookConfig::default()
        });
        let url = format!("http://{addr}/hook");
        for _ in 0..3 {
            assert!(send(&n, &url).await.unwrap_err().is_permanent());
        }
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn loopback_address_refused_unless_allowed() {
        let (addr, hits) = answering(200, &[], "").await;
        let url = format!("http://{addr}/hook");
        let n = WebhookNotifier::new(WebhookConfig::default()).unwrap();
        let e = n.check_target(&url).await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert!(
            e.reason().starts_with("127.0.0.1 is a loopback address"),
            "{e}"
        );
        let e = send(&n, &url).await.unwrap_err();
        assert!(e.is_permanent() && e.reason().contains("loopback"), "{e:?}");
        // Other spellings of the same address.
        for other in [
            format!("http://[::ffff:127.0.0.1]:{}/hook", addr.port()),
            format!("http://0x7f.1:{}/hook", addr.port()),
            format!("http://2130706433:{}/hook", addr.port()),
        ] {
            let e = send(&n, &other).await.unwrap_err();
            assert!(
                e.is_permanent() && e.reason().contains("loopback"),
                "{other}: {e:?}"
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        // Allowed, by address or by network.
        for allow in ["127.0.0.1", "127.0.0.0/8"] {
            let n = WebhookNotifier::new(WebhookConfig {
                allow: vec![rule(allow)],
                ..WebhookConfig::default()
            })
            .unwrap();
            n.check_target(&url).await.unwrap();
            send(&n, &url).await.unwrap();
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn host_name_resolving_to_loopback_refused_unless_allowed() {
        let (addr, hits) = answering(200, &[], "").await;
        let url = format!("http://localhost:{}/hook", addr.port());
        let n = WebhookNotifier::new(WebhookConfig::default()).unwrap();
        let e = n.check_target(&url).await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert!(e.reason().starts_with("localhost resolves to "), "{e}");
        // At connect time, by the resolver (as after a DNS rebinding).
        let e = send(&n, &url).await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert!(e.reason().starts_with("localhost resolves to "), "{e}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        // Refused addresses do not count against the circuit.
        assert!(
            lock(
                &n.target("t1", &format!("http://localhost:{}", addr.port()))
                    .breaker
            )
            .is_idle()
        );

        let n = WebhookNotifier::new(WebhookConfig {
            allow: vec![rule("localhost")],
            ..WebhookConfig::default()
        })
        .unwrap();
        n.check_target(&url).await.unwrap();
        send(&n, &url).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // A host name entry does not allow the address itself.
        let e = send(&n, &format!("http://{addr}/hook")).await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
    }

    #[tokio::test]
    async fn invalid_urls_are_permanent() {
        let n = WebhookNotifier::new(WebhookConfig::default()).unwrap();
        for url in [
            "not a url",
            "ftp://example.com/x",
            "http://",
            "file:///etc/passwd",
        ] {
            let e = n.check_target(url).await.unwrap_err();
            assert!(e.is_permanent(), "{url}: {e:?}");
            let e = send(&n, url).await.unwrap_err();
            assert!(e.is_permanent(), "{url}: {e:?}");
        }
        let e = n
            .check_target("http://169.254.169.254/latest/meta-data/")
            .await
            .unwrap_err();
        assert!(e.reason().contains("link-local"), "{e}");
        let e = n.check_target("http://[fd00:ec2::254]/").await.unwrap_err();
        assert!(e.reason().contains("unique-local"), "{e}");
    }

    #[tokio::test]
    async fn invalid_header_value_is_permanent() {
        let (addr, hits) = answering(200, &[], "").await;
        let n = local(WebhookConfig::default());
        let e = n
            .send(
                "t1",
                &format!("http://{addr}/hook"),
                "sub\n1",
                "k",
                Bytes::new(),
            )
            .await
            .unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }
}
