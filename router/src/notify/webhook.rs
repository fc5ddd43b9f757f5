//! The webhook notifier: POSTs a prepared notification to a subscriber's URL.
//!
//! This module owns:
//! - the address rules that keep webhooks off internal networks (the SSRF guard), checked
//!   when a subscription is created ([`WebhookNotifier::check_target`]) and again at
//!   connect time, by a resolver that drops refused addresses (a host name may resolve
//!   elsewhere by the time we send: DNS rebinding);
//! - back pressure and isolation per target (scheme, host and port): a concurrency limit
//!   and a circuit breaker, so one slow or dead endpoint neither floods nor stalls the
//!   others;
//! - the classification of a failed delivery for the retry logic ([`WebhookError`]) and
//!   the delay before the next attempt ([`backoff`]).
//!
//! What a delivery logs and counts is in [`crate::internal_events`].

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url, redirect};
use tokio::sync::Semaphore;

use crate::internal_events::{WebhookAttempted, WebhookCircuitChanged};

/// Most bytes of a response body read (for the reason of a failure); the rest is dropped
/// unread, so a subscriber cannot make us download a large body.
const BODY_CAP: usize = 512;
/// Above this many targets in the map, idle ones are dropped when a new one is added.
const PRUNE_ABOVE: usize = 4096;

/// Settings of the webhook notifier.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Limit on a whole request, from connecting to the end of the response headers (and
    /// of the bit of body read). Also bounds the wait for a per-target slot. Default 5 s.
    pub timeout: Duration,
    /// Limit on establishing the TCP connection. Default 2 s.
    pub connect_timeout: Duration,
    /// Requests in flight at once to one target (scheme, host and port); more wait.
    /// Default 8; 0 counts as 1.
    pub per_target_concurrency: usize,
    /// Consecutive retryable failures that open a target's circuit. Default 5; 0 counts
    /// as 1.
    pub breaker_failures: u32,
    /// How long an open circuit refuses requests before letting one trial request
    /// through (half-open). Default 30 s.
    pub breaker_open_for: Duration,
    /// Hosts and networks allowed although the address rules refuse them (loopback,
    /// private, link-local…): for development and on-premises subscribers.
    pub allow: Vec<AllowRule>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            per_target_concurrency: 8,
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(30),
            allow: Vec::new(),
        }
    }
}

/// An allow-list entry: an IP address (`127.0.0.1`, `::1`), a network (`10.0.0.0/8`,
/// `fd00::/8`) or a host name (`localhost`). An address or network entry lifts the
/// address rules for the addresses in it, whatever name led there; a host name entry
/// lifts them for that exact host name only (case-insensitive, not its subdomains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule(Allowed);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    Net(IpNet),
    Host(String),
}

/// An allow-list entry that is neither an address, a network nor a host name.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid allow-list entry {0:?}: expected an IP address, a network (10.0.0.0/8) or a host name"
)]
pub struct ParseAllowRuleError(String);

impl FromStr for AllowRule {
    type Err = ParseAllowRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        // `[::1]`, as in a URL.
        let bare = t
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(t);
        if let Ok(net) = bare.parse::<IpNet>() {
            // Normalize `10.1.2.3/8` to `10.0.0.0/8`.
            return Ok(AllowRule(Allowed::Net(net.trunc())));
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(AllowRule(Allowed::Net(IpNet::from(ip))));
        }
        let host = normalize_host(t);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.len() <= 253 && host.split('.').all(label_ok) {
            Ok(AllowRule(Allowed::Host(host)))
        } else {
            Err(ParseAllowRuleError(s.to_owned()))
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Allowed::Net(net) => net.fmt(f),
            Allowed::Host(host) => f.write_str(host),
        }
    }
}

/// Lower case, without the root's trailing dot: how both sides of a host name comparison
/// are spelled.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Why a delivery failed, classified for the retry logic.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Worth retrying later: a timeout, a connection error, a 5xx, 429 or 408 response.
    #[error("{reason} (will retry)")]
    Retryable {
        /// What happened.
        reason: String,
        /// The delay the target asked for in a `Retry-After` header, if any (not clamped:
        /// the retry logic bounds it).
        retry_after: Option<Duration>,
    },
    /// Will never succeed as sent: another 4xx or a 3xx response, an invalid URL, or a
    /// target the address rules refuse.
    #[error("{reason} (will not retry)")]
    Permanent {
        /// What happened.
        reason: String,
    },
    /// The target's circuit is open: the request was not attempted.
    #[error("{}", circuit_open_reason(target, *retry_in))]
    CircuitOpen {
        /// The target, `scheme://host:port`.
        target: String,
        /// When the circuit lets a trial request through (or, while a trial is in flight,
        /// the longest it may take).
        retry_in: Duration,
    },
}

fn circuit_open_reason(target: &str, retry_in: Duration) -> String {
    // Whole milliseconds: humantime would print the nanoseconds too.
    let retry_in = Duration::from_millis(u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX));
    format!(
        "circuit open for {target} after repeated failures; next attempt in {}",
        humantime::format_duration(retry_in)
    )
}

impl WebhookError {
    /// What happened, without the retry verdict.
    pub fn reason(&self) -> String {
        match self {
            WebhookError::Retryable { reason, .. } | WebhookError::Permanent { reason } => {
                reason.clone()
            }
            WebhookError::CircuitOpen { target, retry_in } => {
                circuit_open_reason(target, *retry_in)
            }
        }
    }

    /// Whether retrying is pointless.
    pub fn is_permanent(&self) -> bool {
        matches!(self, WebhookError::Permanent { .. })
    }

    /// The `outcome` label of
    /// [`WEBHOOK_REQUESTS_TOTAL`](crate::internal_events::WEBHOOK_REQUESTS_TOTAL).
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Retryable { .. } => "retryable",
            WebhookError::Permanent { .. } => "permanent",
            WebhookError::CircuitOpen { .. } => "circuit_open",
        }
    }
}

fn permanent(reason: impl Into<String>) -> WebhookError {
    WebhookError::Permanent {
        reason: reason.into(),
    }
}

fn retryable(reason: impl Into<String>) -> WebhookError {
    WebhookError::Retryable {
        reason: reason.into(),
        retry_after: None,
    }
}

// ---------------------------------------------------------------------------------------
// Address rules.

/// Why the address rules refuse `ip`, if they do (before the allow-list).
fn refused_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if a == 100 && (b & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if v4.is_link_local() {
                // Includes 169.254.169.254, the cloud metadata service.
                Some("link-local")
            } else if a == 0 {
                // 0.0.0.0/8: Linux connects 0.0.0.0 to the local host.
                Some("unspecified")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if a == 192 && b == 0 && c == 0 {
                // 192.0.0.0/24: IETF protocol assignments (DS-Lite, NAT64 discovery, ...).
                Some("protocol-assignment")
            } else if a == 198 && (b & 0xfe) == 18 {
                // 198.18.0.0/15: benchmarking networks, routed inside labs.
                Some("benchmarking")
            } else if a >= 240 {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            // IPv4 addresses in IPv6 clothing: `::ffff:127.0.0.1`, and the well-known
            // NAT64 prefix 64:ff9b::/96, which a NAT64 gateway forwards to the embedded
            // IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_class(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return refused_class(IpAddr::from([o[12], o[13], o[14], o[15]]));
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[..6] == [0; 6] {
                // ::a.b.c.d, deprecated; stacks that still honour it reach the IPv4 host.
                Some("IPv4-compatible")
            } else if s[0] == 0x2002 {
                // 6to4: relays forward to the IPv4 address in bits 16-48, whatever it is.
                Some("6to4")
            } else if s[..3] == [0x64, 0xff9b, 0x1] {
                // 64:ff9b:1::/48: NAT64 prefixes for local use, translated like the above.
                Some("local NAT64")
            } else if v6.is_unicast_link_local() {
                Some("link-local")
            } else if (s[0] & 0xffc0) == 0xfec0 {
                Some("site-local")
            } else if v6.is_unique_local() {
                Some("unique-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// Whether a refused class is an internal network that an allow-listed host name may
/// resolve to (a receiver on a private network, on loopback in development). The others
/// (link-local with the metadata service, unspecified, broadcast, multicast, reserved and
/// the tunnelling forms) no legitimate receiver resolves to: an allow-listed name that
/// resolves there is refused all the same, unless a network rule names the address.
fn internal_network(class: &str) -> bool {
    matches!(
        class,
        "loopback" | "private" | "shared (CGNAT)" | "site-local" | "unique-local" | "benchmarking"
    )
}

/// The address rules with the allow-list applied.
#[derive(Debug, Default)]
struct AddressRules {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl AddressRules {
    fn new(allow: &[AllowRule]) -> Self {
        let mut rules = AddressRules::default();
        for rule in allow {
            match &rule.0 {
                Allowed::Net(net) => rules.nets.push(*net),
                Allowed::Host(host) => rules.hosts.push(host.clone()),
            }
        }
        rules
    }

    /// Whether the host name is allow-listed (then its addresses may be internal ones).
    fn host_allowed(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.hosts.contains(&host)
    }

    /// Why `ip`, an address of `host`, is refused, if it is: an allow-listed host may
    /// resolve to internal networks, never to the other refused classes.
    fn refusal_for(&self, host: &str, ip: IpAddr) -> Option<&'static str> {
        let class = self.refusal(ip)?;
        (!(self.host_allowed(host) && internal_network(class))).then_some(class)
    }

    /// Why `ip` is refused, if it is.
    fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let class = refused_class(ip)?;
        // An allowed IPv4 network also covers the IPv4-mapped form of its addresses.
        let v4 = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let allowed = self
            .nets
            .iter()
            .any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)));
        (!allowed).then_some(class)
    }
}

fn refused_address(ip: IpAddr, class: &str) -> String {
    format!(
        "{ip} is a {class} address: webhooks may not target internal networks unless \
         the address is allow-listed"
    )
}

fn refused_host(host: &str, ip: IpAddr, class: &str) -> String {
    format!(
        "{host} resolves to {ip}, a {class} address: webhooks may not target internal \
         networks unless the host or address is allow-listed"
    )
}

/// The resolver of the HTTP client: resolves with the system resolver and drops refused
/// addresses, so that the addresses checked are the ones connected to.
#[derive(Debug)]
struct GuardedResolver {
    rules: Arc<AddressRules>,
}

/// Every address of a host name was refused (the error the resolver returns).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let rules = Arc::clone(&self.rules);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the client puts the URL's port in.
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut kept = Vec::new();
            let mut first_refused = None;
            for addr in addrs {
                match rules.refusal_for(&host, addr.ip()) {
                    None => kept.push(addr),
                    Some(class) => {
                        first_refused.get_or_insert((addr.ip(), class));
                    }
                }
            }
            match (kept.is_empty(), first_refused) {
                (true, Some((ip, class))) => {
                    Err(Box::new(Refused(refused_host(&host, ip, class))) as _)
                }
                (true, None) => Err(format!("{host} resolves to no address").into()),
                (false, _) => Ok(Box::new(kept.into_iter()) as Addrs),
            }
        })
    }
}

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

// ---------------------------------------------------------------------------------------
// Circuit breaker.

/// Evidence about a target's health from one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    /// It answered (2xx, or a 3xx/4xx that says the request is wrong, not the target).
    Up,
    /// A retryable failure: timeout, connection error, 5xx, 429, 408.
    Down,
    /// The target was not contacted (refused by the address rules, no slot free).
    Unknown,
}

/// A change of a circuit's state worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    Opened,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CircuitState {
    Closed,
    Open {
        until: Instant,
    },
    /// One trial request is in flight; it is presumed lost (its caller gave up) after
    /// `trial_until`, and then the next request becomes the trial.
    HalfOpen {
        trial_until: Instant,
    },
}

/// The circuit breaker of one target, a pure state machine: the caller passes the time.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    open_for: Duration,
    /// The longest a trial request can take (slot wait plus request).
    trial_for: Duration,
    failures: u32,
    state: CircuitState,
}

impl Breaker {
    fn new(threshold: u32, open_for: Duration, trial_for: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            trial_for,
            failures: 0,
            state: CircuitState::Closed,
        }
    }

    /// Whether a request may go now; if not, how long until one may.
    fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open { until } | CircuitState::HalfOpen { trial_until: until }
                if now < until =>
            {
                Err(until - now)
            }
            CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => {
                self.state = CircuitState::HalfOpen {
                    trial_until: now + self.trial_for,
                };
                Ok(())
            }
        }
    }

    /// Records the outcome of an admitted request.
    fn record(&mut self, now: Instant, health: Health) -> Option<Transition> {
        match (health, self.state) {
            (Health::Up, CircuitState::Closed) => {
                self.failures = 0;
                None
            }
            // Any answer, even from a request admitted before the circuit opened, shows
            // the target is back.
            (Health::Up, _) => {
                self.failures = 0;
                self.state = CircuitState::Closed;
                Some(Transition::Closed)
            }
            (Health::Down, CircuitState::Closed) => {
                self.failures = self.failures.saturating_add(1);
                (self.failures >= self.threshold).then(|| self.open(now))
            }
            (Health::Down, CircuitState::HalfOpen { .. }) => Some(self.open(now)),
            // A request admitted before the circuit opened, failing late: already known.
            (Health::Down, CircuitState::Open { .. }) => None,
            // The trial did not test the target: let the next request be the trial.
            (Health::Unknown, CircuitState::HalfOpen { .. }) => {
                self.state = CircuitState::Open { until: now };
                None
            }
            (Health::Unknown, _) => None,
        }
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.state = CircuitState::Open {
            until: now + self.open_for,
        };
        Transition::Opened
    }

    /// Closed with no failure counted: nothing to remember.
    fn is_idle(&self) -> bool {
        self.state == CircuitState::Closed && self.failures == 0
    }
}

// ---------------------------------------------------------------------------------------
// The notifier.

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
    pub async fn send(
        &self,
        url: &str,
        subscription: &str,
        key: &str,
        body: Bytes,
    ) -> Result<(), WebhookError> {
        let (host, result, elapsed) = match WebhookUrl::parse(url) {
            Ok(url) => {
                let (result, elapsed) = self.send_to(&url, subscription, key, body).await;
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
        let target = self.target(&url.target);
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

    /// The state of a target, created on first use.
    fn target(&self, key: &str) -> Arc<TargetState> {
        let mut targets = lock(&self.inner.targets);
        if let Some(t) = targets.get(key) {
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
        targets.insert(key.to_owned(), Arc::clone(&t));
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

/// The outcome of a response.
fn classify_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    snippet: &str,
) -> (Result<(), WebhookError>, Health) {
    let mut reason = format!("HTTP {status}");
    if status.is_redirection() {
        reason.push_str(": redirects are not followed; use the final URL");
    } else if !snippet.is_empty() {
        reason.push_str(": ");
        reason.push_str(snippet);
    }
    if status.is_success() {
        (Ok(()), Health::Up)
    } else if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        let e = WebhookError::Retryable {
            reason,
            retry_after,
        };
        (Err(e), Health::Down)
    } else {
        (Err(permanent(reason)), Health::Up)
    }
}

/// The outcome of a request that got no response.
fn classify_error(e: reqwest::Error, timeout: Duration) -> (Result<(), WebhookError>, Health) {
    if let Some(refused) = find_source::<Refused>(&e) {
        return (Err(permanent(refused.to_string())), Health::Unknown);
    }
    // The URL is the subscriber's and may hold a secret; the logs name the host.
    let e = e.without_url();
    if e.is_builder() {
        // E.g. a key or subscription that is not a valid header value.
        return (
            Err(permanent(format!("invalid request: {}", chain(&e)))),
            Health::Unknown,
        );
    }
    let reason = if e.is_timeout() {
        format!(
            "timed out (limit {}): {}",
            humantime::format_duration(timeout),
            chain(&e)
        )
    } else {
        chain(&e)
    };
    (Err(retryable(reason)), Health::Down)
}

/// The first error of type `T` in the source chain of `e`.
fn find_source<'e, T: StdError + 'static>(e: &'e (dyn StdError + 'static)) -> Option<&'e T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// An error and its causes on one line, each message once.
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let msg = err.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = err.source();
    }
    out
}

/// The delay a `Retry-After` header asks for: seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
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

// ---------------------------------------------------------------------------------------
// Backoff.

/// The delay before retry number `attempt` (1-based; 0 counts as 1): exponential backoff
/// with "equal jitter" ("Exponential Backoff And Jitter", AWS Architecture Blog). The
/// base is `initial` doubled per attempt, capped at `max`; the delay is uniform in
/// [base/2, base], so retries spread out but never come back at once.
pub fn backoff(
    attempt: u32,
    initial: Duration,
    max: Duration,
    rng: &mut impl rand::Rng,
) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let base = initial.saturating_mul(1 << doublings).min(max);
    let hi = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(hi / 2..=hi))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus};
    use axum::routing::post;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap()
    }

    #[test]
    fn address_classification() {
        let refused = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.254", "shared (CGNAT)"),
            ("100.100.100.200", "shared (CGNAT)"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("239.1.1.1", "multicast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique-local"),
            ("fd00:ec2::254", "unique-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:100.64.1.1", "shared (CGNAT)"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("192.0.0.1", "protocol-assignment"),
            ("192.0.0.170", "protocol-assignment"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("250.1.2.3", "reserved"),
            ("2002:7f00:1::1", "6to4"),
            ("2002:808:808::1", "6to4"),
            ("64:ff9b:1::a00:1", "local NAT64"),
            ("::127.0.0.1", "IPv4-compatible"),
            ("::8.8.8.8", "IPv4-compatible"),
        ];
        for (addr, class) in refused {
            assert_eq!(refused_class(ip(addr)), Some(class), "{addr}");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.255.255",
            "192.169.0.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2003::1",
            "64:ff9b:2::1",
        ];
        for addr in allowed {
            assert_eq!(refused_class(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn allow_rules_parse() {
        assert_eq!(rule("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(rule(" 10.1.2.3/8 ").to_string(), "10.0.0.0/8");
        assert_eq!(rule("::1").to_string(), "::1/128");
        assert_eq!(rule("[::1]").to_string(), "::1/128");
        assert_eq!(rule("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(rule("LocalHost.").to_string(), "localhost");
        assert_eq!(
            rule("hooks.internal-1.example").to_string(),
            "hooks.internal-1.example"
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "a b",
            "http://x",
            "x..y",
            "x:80",
            "*.example",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allow_rules_lift_refusals() {
        let rules = AddressRules::new(&[rule("10.0.0.0/8"), rule("::1"), rule("Localhost")]);
        assert_eq!(rules.refusal(ip("10.9.8.7")), None);
        assert_eq!(
            rules.refusal(ip("::ffff:10.9.8.7")),
            None,
            "mapped form too"
        );
        assert_eq!(rules.refusal(ip("::1")), None);
        assert_eq!(rules.refusal(ip("127.0.0.1")), Some("loopback"));
        assert_eq!(rules.refusal(ip("192.168.0.1")), Some("private"));
        assert_eq!(rules.refusal(ip("8.8.8.8")), None);
        assert!(rules.host_allowed("localhost"));
        assert!(rules.host_allowed("LOCALHOST."));
        assert!(!rules.host_allowed("sub.localhost"));
        assert!(!rules.host_allowed("localhost.example"));
    }

    #[test]
    fn an_allowed_name_may_resolve_to_internal_networks_only() {
        let rules = AddressRules::new(&[rule("receiver"), rule("169.254.10.0/24")]);
        for internal in [
            "10.1.2.3",
            "127.0.0.1",
            "192.168.5.5",
            "fd00::5",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(
                rules.refusal_for("receiver", ip(internal)),
                None,
                "{internal}"
            );
            assert!(
                rules.refusal_for("other", ip(internal)).is_some(),
                "{internal}"
            );
        }
        for never in [
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("2002:7f00:1::1", "6to4"),
            ("::127.0.0.1", "IPv4-compatible"),
        ] {
            assert_eq!(
                rules.refusal_for("receiver", ip(never.0)),
                Some(never.1),
                "{never:?}"
            );
        }
        // A network rule still lifts any class, for any name.
        assert_eq!(rules.refusal_for("other", ip("169.254.10.9")), None);
    }

    fn breaker() -> (Breaker, Instant) {
        let open_for = Duration::from_secs(30);
        (
            Breaker::new(3, open_for, Duration::from_secs(10)),
            Instant::now(),
        )
    }

    #[test]
    fn breaker_opens_after_consecutive_failures() {
        let (mut b, t0) = breaker();
        assert_eq!(b.admit(t0), Ok(()));
        assert_eq!(b.record(t0, Health::Down), None);
        assert_eq!(b.record(t0, Health::Down), None);
        // An answer (even a 4xx) resets the count.
        assert_eq!(b.record(t0, Health::Up), None);
        assert_eq!(b.record(t0, Health::Down), None);
        assert_eq!(b.record(t0, Health::Down), None);
        // Not contacting the target says nothing either way.
        assert_eq!(b.record(t0, Health::Unknown), None);
        assert_eq!(b.record(t0, Health::Down), Some(Transition::Opened));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Err(Duration::from_secs(20)));
        // A late failure of a request admitted before the opening changes nothing.
        assert_eq!(b.record(t1, Health::Down), None);
        assert_eq!(b.admit(t1), Err(Duration::from_secs(20)));
    }

    #[test]
    fn breaker_half_open_lets_one_trial_through() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.record(t0, Health::Down);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Ok(()), "the trial");
        assert_eq!(b.admit(t1), Err(Duration::from_secs(10)), "one trial only");
        // The trial fails: open again for the full period.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(b.record(t2, Health::Down), Some(Transition::Opened));
        assert_eq!(b.admit(t2), Err(Duration::from_secs(30)));
        // The next trial succeeds: closed, everything goes through.
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(b.admit(t3), Ok(()));
        assert_eq!(b.record(t3, Health::Up), Some(Transition::Closed));
        assert_eq!(b.admit(t3), Ok(()));
        assert_eq!(b.admit(t3), Ok(()));
        assert!(b.is_idle());
    }

    #[test]
    fn breaker_replaces_a_lost_or_untested_trial() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.record(t0, Health::Down);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Ok(()));
        // The trial's caller gave up without recording: after trial_for, another trial.
        assert_eq!(
            b.admit(t1 + Duration::from_secs(9)),
            Err(Duration::from_secs(1))
        );
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.admit(t2), Ok(()));
        // This trial did not reach the target: the next request is the trial.
        assert_eq!(b.record(t2, Health::Unknown), None);
        assert_eq!(b.admit(t2), Ok(()));
        assert_eq!(b.admit(t2), Err(Duration::from_secs(10)));
    }

    #[test]
    fn backoff_bounds_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 0..200 {
            let base = match attempt {
                0 | 1 => initial,
                n if n < 40 => (initial * 2u32.pow((n - 1).min(31))).min(max),
                _ => max,
            };
            for _ in 0..50 {
                let d = backoff(attempt, initial, max, &mut rng);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt}: {d:?} vs {base:?}"
                );
            }
        }
        // The upper bound grows monotonically up to the cap and stays there.
        let mut last = Duration::ZERO;
        for attempt in 1..100 {
            let hi = backoff(attempt, initial, max, &mut MaxRng);
            assert!(hi >= last && hi <= max, "attempt {attempt}");
            last = hi;
        }
        assert_eq!(last, max);
        // No overflow at the extremes.
        let d = backoff(
            u32::MAX,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            &mut rng,
        );
        assert!(d >= Duration::from_secs(1800) && d <= Duration::from_secs(3600));
        backoff(u32::MAX, Duration::MAX, Duration::MAX, &mut rng);
        assert_eq!(backoff(3, Duration::ZERO, max, &mut rng), Duration::ZERO);
    }

    /// An RNG that always picks the top of a range.
    struct MaxRng;

    impl rand::RngCore for MaxRng {
        fn next_u32(&mut self) -> u32 {
            u32::MAX
        }
        fn next_u64(&mut self) -> u64 {
            u64::MAX
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(0xff);
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = SystemTime::now() + Duration::from_secs(90);
        h.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(85) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    // --- Over HTTP, against an axum server on 127.0.0.1.

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
        n.send(url, "sub-1", "key-1", Bytes::from_static(b"{\"a\":1}"))
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
        let target = n.target(&format!("http://{addr}"));
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
                &n.target(&format!("http://localhost:{}", addr.port()))
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
            .send(&format!("http://{addr}/hook"), "sub\n1", "k", Bytes::new())
            .await
            .unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }
}
