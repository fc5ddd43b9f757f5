//! The router's own message on the wire: [`Job`], a unit of the notification outbox
//! (MessagePack, durable AMQP queues), and how an event is shown to a subscription
//! ([`Shape`]). The events a job carries, the derived events the router reads and the
//! notifications it sends are the contract's (`sluice_binding::event`).

use serde::{Deserialize, Serialize};
use sluice_binding::event::Event;
use uuid::Uuid;

use crate::subscription::Content;

/// Version of the [`Job`] format.
pub const FORMAT_VERSION: u32 = 1;

/// An event shown as a subscription's `content` asks.
pub trait Shape {
    /// The event with what `content` leaves out removed.
    fn shaped(self, content: Content) -> Self;
}

impl Shape for Event {
    fn shaped(mut self, content: Content) -> Self {
        if content == Content::Ids {
            self.value = None;
            self.detail = None;
        }
        self
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
    /// A `batch_notify` batch, full or due: rate limit and expiration still apply, its
    /// events and key are fixed.
    Batched,
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

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_binding::event::EventKind;

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
    fn jobs_round_trip() {
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
