//! Events (`docs/binding.md` section 7): what subscriptions match and notifications carry.
//!
//! - [`Event`]: one reading or one derived event, with a stable id (`{batch id}:{reading
//!   index}` for readings, the publisher's id for derived events), so a redelivered batch
//!   produces the same events;
//! - [`DerivedEvent`]: what analytics services publish on the events exchange
//!   (MessagePack), checked by [`DerivedEvent::decode`];
//! - [`Notification`]: what a subscriber receives (JSON), with an idempotency key that is
//!   the same for every delivery attempt of the same events ([`idempotency_key`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::dead_letter::{DeadLetterKind, Refusal};
use crate::model::{BatchView, TenantId};

/// Version of the [`DerivedEvent`] format.
pub const FORMAT_VERSION: u32 = 1;

/// The kind of an event. `reading` is a raw reading from the telemetry partitions; the
/// others are derived events, published on the events exchange by analytics services
/// (fault detection, TR 103 527 Annex A).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A raw reading.
    Reading,
    /// A detected fault of any type (outlier, stuck-at, spike).
    Fault,
    /// A threshold crossing computed by an analytics service.
    Threshold,
}

impl EventKind {
    /// All kinds, in a fixed order.
    pub const ALL: [EventKind; 3] = [EventKind::Reading, EventKind::Fault, EventKind::Threshold];

    /// The name used in JSON, routing keys and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Reading => "reading",
            EventKind::Fault => "fault",
            EventKind::Threshold => "threshold",
        }
    }
}

/// One event, as matched and as notified.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable id: `{batch id}:{reading index}` for readings.
    pub id: String,
    /// Kind.
    pub kind: EventKind,
    /// Device.
    pub device: String,
    /// Metric.
    pub metric: String,
    /// Device timestamp, ns since the Unix epoch.
    pub t: i64,
    /// Value; absent in notifications whose content is `ids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Derived events: what was detected (`"stuck-at for 120 s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// The id of reading `index` of batch `batch`.
    pub fn reading_id(batch: Uuid, index: u32) -> String {
        format!("{}:{index}", batch.simple())
    }

    /// The event of reading `index` of `batch` (which must be in range).
    pub fn reading(batch: &BatchView<'_>, index: u32) -> Self {
        let i = index as usize;
        Self {
            id: Self::reading_id(batch.id, index),
            kind: EventKind::Reading,
            device: batch.devices[batch.d[i] as usize].to_owned(),
            metric: batch.metrics[batch.m[i] as usize].to_owned(),
            t: batch.t[i],
            value: Some(batch.x[i]),
            detail: None,
        }
    }
}

/// A derived event on the events exchange (`{namespace}.events`, topic, routing key
/// `{tenant}.{kind}`): MessagePack of this struct, as a map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DerivedEvent {
    /// [`FORMAT_VERSION`].
    pub v: u32,
    /// Tenant the event belongs to.
    pub tenant: String,
    /// The event; its kind must not be `reading`.
    pub event: Event,
}

impl DerivedEvent {
    /// The routing key it is published with: `{tenant}.{kind}`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.tenant, self.event.kind.as_str())
    }

    /// Encodes as a MessagePack map.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a derived event always serialises")
    }

    /// Decodes a body and checks it against the rules of section 7: a version this crate
    /// reads, a kind other than `reading` (readings travel on the telemetry exchange), a
    /// valid tenant id. A refused body is dead-lettered with the [`Refusal`].
    pub fn decode(body: &[u8]) -> Result<Self, Refusal> {
        let ev: Self = rmp_serde::from_slice(body).map_err(|e| {
            Refusal::new(DeadLetterKind::Decode, format!("not a derived event: {e}"))
        })?;
        if ev.v != FORMAT_VERSION {
            return Err(Refusal::new(
                DeadLetterKind::UnsupportedVersion,
                format!("derived event version {}", ev.v),
            ));
        }
        if ev.event.kind == EventKind::Reading {
            return Err(Refusal::new(
                DeadLetterKind::Invalid,
                "readings travel on the telemetry exchange, not as derived events",
            ));
        }
        if !TenantId::is_valid(&ev.tenant) {
            return Err(Refusal::new(
                DeadLetterKind::Invalid,
                format!("invalid tenant id {:?}", ev.tenant),
            ));
        }
        Ok(ev)
    }
}

/// What a subscriber receives: JSON, by POST to a webhook, as the body of an AMQP message,
/// as the `notification` field of a Redis stream entry, or as the data of a server-sent
/// event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The idempotency key (also the `Idempotency-Key` header, AMQP `message_id`, and the
    /// Redis stream entry's `id` field): the same for every delivery attempt of the same
    /// events to the same subscription.
    pub id: String,
    /// Subscription id.
    pub subscription: Uuid,
    /// Tenant.
    pub tenant: String,
    /// The events in the order they were matched (one, or up to `batch_notify.count`).
    pub events: Vec<Event>,
    /// When the router sent it (ns since the Unix epoch).
    pub sent: i64,
}

/// The idempotency key of a notification of `events` to `subscription`.
pub fn idempotency_key(subscription: Uuid, events: &[Event]) -> String {
    let mut h = Sha256::new();
    h.update(subscription.as_bytes());
    for e in events {
        h.update(e.id.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> Event {
        Event {
            id: id.to_owned(),
            kind: EventKind::Reading,
            device: "d".into(),
            metric: "m".into(),
            t: 1,
            value: Some(2.0),
            detail: None,
        }
    }

    #[test]
    fn a_reading_event_names_its_batch_and_index() {
        let mut b = crate::model::BatchBuilder::new("acme", "p", 0);
        b.push("d1", "temp", 5, 1.5);
        b.push("d2", "hum", 6, 2.5);
        let body = crate::codec::encode(&b.finish(7)).unwrap();
        let view = crate::codec::decode(&body).unwrap();
        let e = Event::reading(&view, 1);
        assert_eq!(e.id, format!("{}:1", view.id.simple()));
        assert_eq!(
            (e.kind, e.device.as_str(), e.metric.as_str(), e.t, e.value),
            (EventKind::Reading, "d2", "hum", 6, Some(2.5))
        );
    }

    #[test]
    fn key_depends_on_subscription_and_events_only() {
        let s = Uuid::from_u128(7);
        let a = idempotency_key(s, &[ev("a"), ev("b")]);
        assert_eq!(a, idempotency_key(s, &[ev("a"), ev("b")]));
        assert_eq!(a.len(), 32);
        assert_ne!(a, idempotency_key(s, &[ev("ab")]));
        assert_ne!(a, idempotency_key(Uuid::from_u128(8), &[ev("a"), ev("b")]));
    }

    fn derived(tenant: &str, kind: EventKind) -> DerivedEvent {
        DerivedEvent {
            v: FORMAT_VERSION,
            tenant: tenant.into(),
            event: Event {
                kind,
                detail: Some("spike".into()),
                ..ev("f1")
            },
        }
    }

    #[test]
    fn derived_events_round_trip_as_maps() {
        let d = derived("t", EventKind::Fault);
        assert_eq!(DerivedEvent::decode(&d.encode()).unwrap(), d);
        assert_eq!(d.routing_key(), "t.fault");
        // A map with the documented keys, so other languages can build it from a dict.
        let map: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            rmp_serde::from_slice(&d.encode()).unwrap();
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["event", "tenant", "v"]);
    }

    #[test]
    fn derived_events_that_break_the_rules_are_refused_with_their_kind() {
        let kind = |body: &[u8]| DerivedEvent::decode(body).unwrap_err().kind;
        assert_eq!(kind(b"\xc1"), DeadLetterKind::Decode);
        let future = DerivedEvent {
            v: 2,
            ..derived("t", EventKind::Fault)
        };
        assert_eq!(kind(&future.encode()), DeadLetterKind::UnsupportedVersion);
        let reading = derived("t", EventKind::Reading);
        assert_eq!(kind(&reading.encode()), DeadLetterKind::Invalid);
        let bad_tenant = derived("../x", EventKind::Threshold);
        let refusal = DerivedEvent::decode(&bad_tenant.encode()).unwrap_err();
        assert_eq!(refusal.kind, DeadLetterKind::Invalid);
        assert!(refusal.reason.contains("invalid tenant id"), "{refusal}");
    }
}
