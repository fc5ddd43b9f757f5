//! Subscriptions: what a tenant asks to be notified of (criteria), how (policy) and where
//! (target). This module owns the JSON shape of the subscription API and its validation;
//! `docs/router.md` is the user-facing description.
//!
//! The policies follow oneM2M `<subscription>` semantics (TS-0001 / TS-0004):
//! `batch_notify` = `bn{num,dur}`, `rate_limit` = `rl{mnn,tww}` with `latest_notify` = `ln`,
//! `expiration_counter` = `exc`, `content` = `nct` (readings ≈ 4 "trigger payload",
//! ids ≈ 3 "resource id").

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_binding::TenantId;
use sluice_binding::event::EventKind;
use uuid::Uuid;

/// Most patterns a criteria list may hold (each list).
pub const MAX_PATTERNS: usize = 64;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 256;
/// Most `*` in one pattern: a glob is matched in O(name × pattern) without backtracking,
/// and each `*` is a segment searched.
pub const MAX_WILDCARDS: usize = 8;
/// Most subscriptions of one tenant that are *scanned*: neither every device pattern nor
/// every metric pattern has a literal prefix (`*-boiler` on both sides), so no index can
/// narrow them and each is checked against every series of that tenant's batches.
pub const MAX_SCANNED_PER_TENANT: usize = 16;
/// Most pattern bytes (devices and metrics together) in one scanned subscription.
pub const MAX_SCANNED_PATTERN_BYTES: usize = 1024;
/// Largest `batch_notify.count`: a held batch pins its deliveries on the broker, so the
/// notifier's prefetch bounds it.
pub const MAX_BATCH_COUNT: u32 = 1000;
/// `MAXLEN ~` of a Redis-stream target that sets none: Redis memory is shared by every
/// tenant, so no stream is unbounded.
pub const DEFAULT_STREAM_MAXLEN: u64 = 10_000;
/// Largest `maxlen` of one Redis-stream target.
pub const MAX_STREAM_MAXLEN: u64 = 1_000_000;
/// Most stream entries a tenant's Redis-stream targets may keep in all (the sum of their
/// `maxlen`s).
pub const MAX_STREAM_ENTRIES_PER_TENANT: u64 = 2_000_000;
/// Longest `batch_notify.duration` and `rate_limit.window`.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// A batch without a duration is still flushed after this long, so a slow trickle of
/// events is not held forever.
pub const DEFAULT_BATCH_DURATION: Duration = Duration::from_secs(10);

/// A stored subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Assigned by the API (UUID v7: sortable by creation time).
    pub id: Uuid,
    /// Owner; set from the API key, never from the body.
    pub tenant: TenantId,
    /// Free text chosen by the subscriber.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What matches.
    pub criteria: Criteria,
    /// How notifications are shaped and paced.
    #[serde(default)]
    pub policy: Policy,
    /// Where notifications go.
    pub target: Target,
    /// Creation time, ns since the Unix epoch.
    pub created: i64,
}

/// The body of `POST /v1/subscriptions`: a subscription before it has an id and owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    /// Free text chosen by the subscriber.
    #[serde(default)]
    pub name: Option<String>,
    /// What matches.
    pub criteria: Criteria,
    /// How notifications are shaped and paced.
    #[serde(default)]
    pub policy: Policy,
    /// Where notifications go.
    pub target: Target,
}

/// What a subscription matches. An event matches when its kind is listed, its device
/// matches one of `devices`, its metric one of `metrics`, and the value predicate (if any)
/// holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criteria {
    /// Device patterns: `*` matches any run of characters (including none), `?` exactly
    /// one; every other character is literal. Default: `["*"]`.
    #[serde(default = "all")]
    pub devices: Vec<String>,
    /// Metric patterns, same syntax. Default: `["*"]`.
    #[serde(default = "all")]
    pub metrics: Vec<String>,
    /// Event kinds. Default: `["reading"]`.
    #[serde(default = "readings_only")]
    pub kinds: Vec<EventKind>,
    /// Optional predicate on the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<ValuePredicate>,
}

fn all() -> Vec<String> {
    vec!["*".to_owned()]
}

fn readings_only() -> Vec<EventKind> {
    vec![EventKind::Reading]
}

/// A predicate on the value of an event. Exactly one key:
/// `{"above": x}`, `{"below": x}`, `{"outside": [lo, hi]}`, `{"changed_by": d}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ValuePredicate {
    /// value > x.
    Above(f64),
    /// value < x.
    Below(f64),
    /// value < lo or value > hi.
    Outside(f64, f64),
    /// |value − previous value of the same device and metric| > d. The first value seen of
    /// a series does not match (there is nothing to compare it with).
    ChangedBy(f64),
}

impl ValuePredicate {
    /// Whether `value` satisfies the predicate; `previous` is the last value of the series
    /// seen before this one, if any.
    pub fn holds(&self, value: f64, previous: Option<f64>) -> bool {
        match *self {
            ValuePredicate::Above(x) => value > x,
            ValuePredicate::Below(x) => value < x,
            ValuePredicate::Outside(lo, hi) => value < lo || value > hi,
            ValuePredicate::ChangedBy(d) => previous.is_some_and(|p| (value - p).abs() > d),
        }
    }
}

/// Notification policies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Group events into one notification (oneM2M `batchNotify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_notify: Option<BatchNotify>,
    /// Pace notifications (oneM2M `rateLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The subscription is deleted after this many notifications (oneM2M
    /// `expirationCounter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_counter: Option<u64>,
    /// What a notification carries.
    #[serde(default)]
    pub content: Content,
}

/// oneM2M `batchNotify`: a notification carries up to `count` events, and is sent at the
/// latest `duration` after its first event arrived.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNotify {
    /// Events per notification (1 to [`MAX_BATCH_COUNT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Longest wait from a batch's first event to its notification (`"5s"`, `"250ms"`);
    /// [`DEFAULT_BATCH_DURATION`] when only `count` is given.
    #[serde(
        default,
        with = "opt_humantime",
        skip_serializing_if = "Option::is_none"
    )]
    pub duration: Option<Duration>,
}

impl BatchNotify {
    /// Events per notification.
    pub fn count(&self) -> u32 {
        self.count.unwrap_or(MAX_BATCH_COUNT)
    }

    /// Longest hold.
    pub fn duration(&self) -> Duration {
        self.duration.unwrap_or(DEFAULT_BATCH_DURATION)
    }
}

/// oneM2M `rateLimit`: at most `max` notifications per `window`. Excess notifications are
/// held as pending and sent when the window allows; with `latest_notify`, only the newest
/// pending notification is kept (oneM2M `latestNotify`), the others are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Notifications per window (≥ 1).
    pub max: u32,
    /// The window (`"1m"`).
    #[serde(with = "humantime_serde_dur")]
    pub window: Duration,
    /// Keep only the newest pending notification.
    #[serde(default)]
    pub latest_notify: bool,
}

/// What a notification carries (oneM2M `notificationContentType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Every field of every event (device, metric, timestamp, value, kind, detail).
    #[default]
    Readings,
    /// Identifiers only: device, metric, timestamp and kind, no value.
    Ids,
}

/// Where notifications go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// HTTP POST of the notification as JSON.
    Webhook {
        /// `http://` or `https://` URL. Loopback, private and link-local addresses are
        /// refused unless the router's allow-list names them.
        url: String,
    },
    /// AMQP publish (persistent, confirmed, mandatory) to an exchange the operator granted
    /// the tenant (tenants file, `amqp_exchanges`); see [`crate::notify::amqp`].
    Amqp {
        /// One of the tenant's granted exchanges; never the default exchange, `amq.*` or
        /// Sluice's own namespace.
        exchange: String,
        /// Routing key.
        #[serde(default)]
        routing_key: String,
    },
    /// `XADD` to a Redis stream.
    RedisStream {
        /// Stream key; the router prefixes it with `sluice:notify:{tenant}:` so tenants
        /// cannot write into each other's (or Sluice's own) keys.
        stream: String,
        /// Approximate cap on the stream length (`MAXLEN ~`), 1 to [`MAX_STREAM_MAXLEN`];
        /// absent = [`DEFAULT_STREAM_MAXLEN`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maxlen: Option<u64>,
    },
    /// The live feed: server-sent events at `GET /v1/subscriptions/{id}/live`. Best effort
    /// by nature: notifications produced while nobody listens are dropped (and counted).
    Live,
}

impl Target {
    /// Stream entries the target keeps in Redis at most (0 for other targets).
    pub fn stream_entries(&self) -> u64 {
        match self {
            Target::RedisStream { maxlen, .. } => maxlen.unwrap_or(DEFAULT_STREAM_MAXLEN),
            _ => 0,
        }
    }

    /// The kind, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Webhook { .. } => "webhook",
            Target::Amqp { .. } => "amqp",
            Target::RedisStream { .. } => "redis_stream",
            Target::Live => "live",
        }
    }
}

/// Why a subscription was refused; the message is shown to the API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSubscription {
    /// JSON path of the offending field (`criteria.devices[2]`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl fmt::Display) -> InvalidSubscription {
    InvalidSubscription {
        field: field.into(),
        message: message.to_string(),
    }
}

impl NewSubscription {
    /// Checks every rule the JSON shape does not express. Target addresses (webhook SSRF
    /// rules) are checked separately, by the notifier that knows the allow-list.
    pub fn validate(&self) -> Result<(), InvalidSubscription> {
        if let Some(name) = &self.name
            && name.len() > 200
        {
            return Err(invalid("name", "longer than 200 bytes"));
        }
        self.criteria.validate()?;
        self.policy.validate()?;
        match &self.target {
            Target::Webhook { url } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid("target.url", "must start with http:// or https://"));
                }
                if url.len() > 2048 {
                    return Err(invalid("target.url", "longer than 2048 bytes"));
                }
            }
            Target::Amqp {
                exchange,
                routing_key,
            } => {
                if exchange.len() > 255 || routing_key.len() > 255 {
                    return Err(invalid(
                        "target",
                        "exchange and routing_key: at most 255 bytes",
                    ));
                }
                if exchange.is_empty() {
                    return Err(invalid(
                        "target.exchange",
                        "required: one of the exchanges the operator granted this tenant",
                    ));
                }
                // The broker's own; Sluice's namespace is the grants' to refuse, as only they
                // know the configured one (`notify::amqp::AmqpGrants`).
                if exchange.starts_with("amq.") {
                    return Err(invalid("target.exchange", "reserved name"));
                }
            }
            Target::RedisStream { stream, maxlen } => {
                if stream.is_empty() || stream.len() > 200 {
                    return Err(invalid("target.stream", "1 to 200 bytes"));
                }
                if maxlen.is_some_and(|n| !(1..=MAX_STREAM_MAXLEN).contains(&n)) {
                    return Err(invalid(
                        "target.maxlen",
                        format!("1 to {MAX_STREAM_MAXLEN}"),
                    ));
                }
            }
            Target::Live => {}
        }
        Ok(())
    }

    /// The stored subscription.
    pub fn into_subscription(self, id: Uuid, tenant: TenantId, created: i64) -> Subscription {
        Subscription {
            id,
            tenant,
            name: self.name,
            criteria: self.criteria,
            policy: self.policy,
            target: self.target,
            created,
        }
    }
}

impl Criteria {
    /// Whether no index can narrow these criteria: some device pattern and some metric
    /// pattern start with a wildcard. The matching index checks such subscriptions on
    /// every lookup of their tenant (its residual list), so their number and size are
    /// bounded ([`MAX_SCANNED_PER_TENANT`], [`MAX_SCANNED_PATTERN_BYTES`]).
    pub fn is_scanned(&self) -> bool {
        let unprefixed = |ps: &[String]| ps.iter().any(|p| p.starts_with(['*', '?']));
        unprefixed(&self.devices) && unprefixed(&self.metrics)
    }

    fn validate(&self) -> Result<(), InvalidSubscription> {
        for (field, list) in [("devices", &self.devices), ("metrics", &self.metrics)] {
            if list.is_empty() {
                return Err(invalid(format!("criteria.{field}"), "must not be empty"));
            }
            if list.len() > MAX_PATTERNS {
                return Err(invalid(
                    format!("criteria.{field}"),
                    format!("at most {MAX_PATTERNS} patterns"),
                ));
            }
            for (i, p) in list.iter().enumerate() {
                if p.is_empty() || p.len() > MAX_PATTERN_LEN {
                    return Err(invalid(
                        format!("criteria.{field}[{i}]"),
                        format!("1 to {MAX_PATTERN_LEN} bytes"),
                    ));
                }
                if p.matches('*').count() > MAX_WILDCARDS {
                    return Err(invalid(
                        format!("criteria.{field}[{i}]"),
                        format!("at most {MAX_WILDCARDS} '*' in a pattern"),
                    ));
                }
            }
        }
        if self.is_scanned() {
            let bytes: usize = self
                .devices
                .iter()
                .chain(&self.metrics)
                .map(String::len)
                .sum();
            if bytes > MAX_SCANNED_PATTERN_BYTES {
                return Err(invalid(
                    "criteria",
                    format!(
                        "patterns starting with a wildcard on both devices and metrics are \
                         checked against every reading: at most {MAX_SCANNED_PATTERN_BYTES} \
                         bytes of patterns then (give the devices or the metrics a literal \
                         prefix to lift it)"
                    ),
                ));
            }
        }
        if self.kinds.is_empty() {
            return Err(invalid("criteria.kinds", "must not be empty"));
        }
        match self.value {
            Some(ValuePredicate::Above(x) | ValuePredicate::Below(x)) if !x.is_finite() => {
                Err(invalid("criteria.value", "must be a finite number"))
            }
            Some(ValuePredicate::Outside(lo, hi))
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) =>
            {
                Err(invalid(
                    "criteria.value.outside",
                    "expected [lo, hi] with lo <= hi",
                ))
            }
            Some(ValuePredicate::ChangedBy(d)) if !(d.is_finite() && d >= 0.0) => Err(invalid(
                "criteria.value.changed_by",
                "must be a number >= 0",
            )),
            _ => Ok(()),
        }
    }
}

impl Policy {
    fn validate(&self) -> Result<(), InvalidSubscription> {
        if let Some(b) = &self.batch_notify {
            if b.count.is_none() && b.duration.is_none() {
                return Err(invalid(
                    "policy.batch_notify",
                    "give count, duration or both",
                ));
            }
            if let Some(c) = b.count
                && !(1..=MAX_BATCH_COUNT).contains(&c)
            {
                return Err(invalid(
                    "policy.batch_notify.count",
                    format!("1 to {MAX_BATCH_COUNT}"),
                ));
            }
            if let Some(d) = b.duration
                && (d.is_zero() || d > MAX_WINDOW)
            {
                return Err(invalid(
                    "policy.batch_notify.duration",
                    "above 0 and at most 24h",
                ));
            }
        }
        if let Some(r) = &self.rate_limit {
            if r.max == 0 {
                return Err(invalid("policy.rate_limit.max", "must be at least 1"));
            }
            if r.window < Duration::from_millis(100) || r.window > MAX_WINDOW {
                return Err(invalid("policy.rate_limit.window", "100ms to 24h"));
            }
        }
        if self.expiration_counter == Some(0) {
            return Err(invalid("policy.expiration_counter", "must be at least 1"));
        }
        Ok(())
    }
}

/// `"5s"`-style durations.
mod humantime_serde_dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Optional `"5s"`-style durations.
mod opt_humantime {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NewSubscription, String> {
        let s: NewSubscription = serde_json::from_str(json).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn defaults_match_every_reading() {
        let s = parse(r#"{"criteria":{},"target":{"type":"live"}}"#).unwrap();
        assert_eq!(s.criteria.devices, ["*"]);
        assert_eq!(s.criteria.metrics, ["*"]);
        assert_eq!(s.criteria.kinds, [EventKind::Reading]);
        assert_eq!(s.policy, Policy::default());
    }

    #[test]
    fn full_shape_round_trips() {
        let json = r#"{"name":"hot","criteria":{"devices":["boiler-*"],"metrics":["temp"],
            "kinds":["reading","fault"],"value":{"outside":[0,80]}},
            "policy":{"batch_notify":{"count":10,"duration":"5s"},
                      "rate_limit":{"max":5,"window":"1m","latest_notify":true},
                      "expiration_counter":100,"content":"ids"},
            "target":{"type":"webhook","url":"https://example.com/hook"}}"#;
        let s = parse(json).unwrap();
        assert_eq!(s.criteria.value, Some(ValuePredicate::Outside(0.0, 80.0)));
        let rl = s.policy.rate_limit.unwrap();
        assert_eq!(
            (rl.max, rl.window, rl.latest_notify),
            (5, Duration::from_secs(60), true)
        );
        let back: NewSubscription =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn refusals_name_the_field() {
        for (json, field) in [
            (
                r#"{"criteria":{"devices":[]},"target":{"type":"live"}}"#,
                "criteria.devices",
            ),
            (
                r#"{"criteria":{"value":{"outside":[5,1]}},"target":{"type":"live"}}"#,
                "criteria.value.outside",
            ),
            (
                r#"{"criteria":{},"policy":{"batch_notify":{}},"target":{"type":"live"}}"#,
                "policy.batch_notify",
            ),
            (
                r#"{"criteria":{},"policy":{"batch_notify":{"count":5000}},"target":{"type":"live"}}"#,
                "policy.batch_notify.count",
            ),
            (
                r#"{"criteria":{},"policy":{"rate_limit":{"max":0,"window":"1s"}},"target":{"type":"live"}}"#,
                "policy.rate_limit.max",
            ),
            (
                r#"{"criteria":{},"policy":{"expiration_counter":0},"target":{"type":"live"}}"#,
                "policy.expiration_counter",
            ),
            (
                r#"{"criteria":{},"target":{"type":"webhook","url":"ftp://x"}}"#,
                "target.url",
            ),
            (
                r#"{"criteria":{},"target":{"type":"amqp","exchange":"amq.topic","routing_key":"0"}}"#,
                "target.exchange",
            ),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.starts_with(field), "{json}: {err}");
        }
    }

    #[test]
    fn exchange_shapes_leave_the_namespace_to_the_grants() {
        // `sluice.` is only reserved when it is the configured namespace, which the shape
        // check does not know; `amq.` is always the broker's.
        let ok = parse(r#"{"criteria":{},"target":{"type":"amqp","exchange":"sluice.alerts"}}"#);
        assert!(ok.is_ok(), "{ok:?}");
        let amq = parse(r#"{"criteria":{},"target":{"type":"amqp","exchange":"amq.direct"}}"#);
        assert!(amq.unwrap_err().contains("reserved name"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(parse(r#"{"criteria":{"device":["x"]},"target":{"type":"live"}}"#).is_err());
        assert!(parse(r#"{"criteria":{},"target":{"type":"carrier-pigeon"}}"#).is_err());
    }

    #[test]
    fn predicates() {
        assert!(ValuePredicate::Above(1.0).holds(1.5, None));
        assert!(!ValuePredicate::Above(1.0).holds(1.0, None));
        assert!(ValuePredicate::Below(1.0).holds(0.5, None));
        assert!(ValuePredicate::Outside(0.0, 10.0).holds(-1.0, None));
        assert!(!ValuePredicate::Outside(0.0, 10.0).holds(10.0, None));
        assert!(!ValuePredicate::ChangedBy(2.0).holds(5.0, None));
        assert!(ValuePredicate::ChangedBy(2.0).holds(5.0, Some(2.5)));
        assert!(!ValuePredicate::ChangedBy(2.0).holds(5.0, Some(4.0)));
    }
}
