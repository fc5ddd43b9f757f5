//! The messages of the router, on the wire:
//! - [`DerivedEvent`]: what analytics services publish on the events exchange (MessagePack);
//! - [`Job`]: a unit of the notification outbox (MessagePack, durable AMQP queues);
//! - [`Notification`]: what a subscriber receives (JSON).
//!
//! Every event has a stable id (`{batch id}:{reading index}` for readings, the publisher's
//! id for derived events), so a redelivered batch produces the same events, and a
//! notification's idempotency key is a digest of its subscription and event ids.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::subscription::{Content, EventKind};

/// Version of the [`Job`] and [`DerivedEvent`] formats.
pub const FORMAT_VERSION: u32 = 1;

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

    /// The event as `content` asks to show it.
    pub fn shaped(mut self, content: Content) -> Self {
        if content == Content::Ids {
            self.value = None;
            self.detail = None;
        }
        self
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
    /// Encodes as a MessagePack map.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a derived event always serialises")
    }

    /// Decodes.
    pub fn decode(body: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(body)
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Events just matched: batching, rate limit and expiration counter still apply.
    Fresh,
    /// A notification held back by the rate limit: rate limit and expiration still apply,
    /// its events and key are fixed.
    Pending,
    /// A notification whose delivery failed `attempt` times: only delivery remains.
    Retry {
        /// Failed attempts so far.
        attempt: u32,
    },
}

/// A unit of the notification outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// [`FORMAT_VERSION`].
    pub v: u32,
    /// Tenant of the subscription.
    pub tenant: String,
    /// Subscription.
    pub subscription: Uuid,
    /// Where it is in its life.
    pub stage: Stage,
    /// Device timestamp of the oldest event, for the notify latency (ns).
    pub oldest: i64,
    /// The events, each as a 7-element array in [`Event`]'s field order: positional
    /// fields make a job about a third smaller than maps and decode without matching
    /// field names. Decoding takes either form, so jobs written as maps still read.
    #[serde(serialize_with = "events_as_arrays")]
    pub events: Vec<Event>,
}

fn events_as_arrays<S: serde::Serializer>(events: &[Event], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::{SerializeSeq, SerializeTuple};
    struct AsArray<'a>(&'a Event);
    impl Serialize for AsArray<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let e = self.0;
            let mut t = s.serialize_tuple(7)?;
            t.serialize_element(&e.id)?;
            t.serialize_element(&e.kind)?;
            t.serialize_element(&e.device)?;
            t.serialize_element(&e.metric)?;
            t.serialize_element(&e.t)?;
            t.serialize_element(&e.value)?;
            t.serialize_element(&e.detail)?;
            t.end()
        }
    }
    let mut seq = s.serialize_seq(Some(events.len()))?;
    for e in events {
        seq.serialize_element(&AsArray(e))?;
    }
    seq.end()
}

impl Job {
    /// A job of `events` for `subscription`, at `stage`.
    pub fn new(tenant: &str, subscription: Uuid, stage: Stage, events: Vec<Event>) -> Self {
        Self {
            v: FORMAT_VERSION,
            tenant: tenant.to_owned(),
            subscription,
            stage,
            oldest: events.iter().map(|e| e.t).min().unwrap_or(0),
            events,
        }
    }

    /// Encodes as a MessagePack map.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a job always serialises")
    }

    /// Decodes.
    pub fn decode(body: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(body)
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
    /// The events, oldest first (one, or up to `batch_notify.count`).
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
    fn key_depends_on_subscription_and_events_only() {
        let s = Uuid::from_u128(7);
        let a = idempotency_key(s, &[ev("a"), ev("b")]);
        assert_eq!(a, idempotency_key(s, &[ev("a"), ev("b")]));
        assert_eq!(a.len(), 32);
        assert_ne!(a, idempotency_key(s, &[ev("ab")]));
        assert_ne!(a, idempotency_key(Uuid::from_u128(8), &[ev("a"), ev("b")]));
    }

    #[test]
    fn jobs_and_events_round_trip() {
        let job = Job {
            v: FORMAT_VERSION,
            tenant: "t".into(),
            subscription: Uuid::from_u128(1),
            stage: Stage::Retry { attempt: 3 },
            oldest: 5,
            events: vec![ev("x")],
        };
        assert_eq!(Job::decode(&job.encode()).unwrap(), job);
        let derived = Job {
            events: vec![Event {
                kind: EventKind::Fault,
                value: None,
                detail: Some("spike".into()),
                ..ev("y")
            }],
            ..job.clone()
        };
        assert_eq!(Job::decode(&derived.encode()).unwrap(), derived);
        let d = DerivedEvent {
            v: 1,
            tenant: "t".into(),
            event: Event {
                kind: EventKind::Fault,
                detail: Some("spike".into()),
                ..ev("f1")
            },
        };
        assert_eq!(DerivedEvent::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn jobs_written_with_events_as_maps_still_decode() {
        // The first job format: every event a map. Such jobs may wait in a delay queue
        // across an upgrade.
        #[derive(Serialize)]
        struct MapJob<'a> {
            v: u32,
            tenant: &'a str,
            subscription: Uuid,
            stage: Stage,
            oldest: i64,
            events: &'a [Event],
        }
        let events = [ev("a"), ev("b")];
        let old = rmp_serde::to_vec_named(&MapJob {
            v: 1,
            tenant: "t",
            subscription: Uuid::from_u128(1),
            stage: Stage::Fresh,
            oldest: 1,
            events: &events,
        })
        .unwrap();
        let job = Job::decode(&old).unwrap();
        assert_eq!(job.events, events);
        assert!(job.encode().len() < old.len());
    }

    #[test]
    fn ids_content_drops_values() {
        let e = ev("a").shaped(Content::Ids);
        assert_eq!(e.value, None);
        assert_eq!(ev("a").shaped(Content::Readings).value, Some(2.0));
    }
}
