//! The matching half of the stage, which needs no broker: a telemetry batch or a derived
//! event in, the jobs of the subscriptions it matched out (or why it is refused).

use std::sync::Arc;

use sluice_binding::Refusal;
use sluice_binding::codec;
use sluice_binding::model::now_ns;
use sluice_binding::tenancy::{Publisher, Tenants};
use sluice_binding::validate::{self, Limits};

use sluice_binding::event::{DerivedEvent, Event, EventKind};

use crate::internal_events::EventsReceived;
use crate::job::{Job, Stage};
use crate::matching::Matcher;
use crate::sync::SharedIndex;

/// Turns events into jobs: one [`Matcher`] (so one consumer's series memory) over the
/// shared index.
pub(super) struct JobMatcher {
    index: SharedIndex,
    /// Who may publish each tenant's batches and derived events (`amqp_users`).
    tenants: Arc<Tenants>,
    limits: Limits,
    matcher: Matcher,
    max_events_per_job: usize,
}

impl JobMatcher {
    /// Remembers at most `max_series` previous values; a job carries at most
    /// `max_events_per_job` events.
    pub(super) fn new(
        index: SharedIndex,
        tenants: Arc<Tenants>,
        limits: Limits,
        max_series: usize,
        max_events_per_job: usize,
    ) -> Self {
        Self {
            index,
            tenants,
            limits,
            matcher: Matcher::new(max_series),
            max_events_per_job: max_events_per_job.max(1),
        }
    }

    /// Jobs of one telemetry batch, or why it is refused.
    pub(super) fn telemetry(
        &mut self,
        body: &[u8],
        publisher: &Publisher,
    ) -> Result<Vec<Job>, Refusal> {
        let view = codec::decode(body)?;
        self.tenants.check_batch_publisher(publisher, view.tenant)?;
        validate::validate(&view, now_ns(), &self.limits)?;
        EventsReceived {
            kind: EventKind::Reading.as_str(),
            count: view.len(),
        }
        .emit();
        let matches = {
            let index = self.index.load();
            self.matcher.match_batch(&index, &view)
        };
        let mut jobs = Vec::new();
        for (sub, readings) in matches.per_subscription {
            for chunk in readings.chunks(self.max_events_per_job) {
                let events: Vec<Event> = chunk.iter().map(|&i| Event::reading(&view, i)).collect();
                jobs.push(Job::new(view.tenant, sub.id, Stage::Fresh, events));
            }
        }
        Ok(jobs)
    }

    /// Jobs of one derived event, or why it is refused.
    pub(super) fn derived(
        &mut self,
        body: &[u8],
        publisher: &Publisher,
    ) -> Result<Vec<Job>, Refusal> {
        let ev = DerivedEvent::decode(body)?;
        self.tenants.check_publisher(publisher, &ev.tenant)?;
        EventsReceived {
            kind: ev.event.kind.as_str(),
            count: 1,
        }
        .emit();
        let e = &ev.event;
        let subs = {
            let index = self.index.load();
            self.matcher.match_event(
                &index,
                &ev.tenant,
                e.kind,
                &e.device,
                &e.metric,
                e.value.unwrap_or(f64::NAN),
            )
        };
        Ok(subs
            .into_iter()
            .map(|s| Job::new(&ev.tenant, s.id, Stage::Fresh, vec![ev.event.clone()]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_binding::codec;
    use sluice_binding::dead_letter::DeadLetterKind;
    use sluice_binding::event;
    use sluice_binding::model::BatchBuilder;
    use uuid::Uuid;

    use super::*;
    use crate::matching::Index;
    use crate::subscription::{Subscription, ValuePredicate};
    use crate::testing::sub_with;

    /// A subscription of `tenant`'s `temp` above 50 on these devices.
    fn over_50(tenant: &str, devices: &[&str], kinds: &[EventKind]) -> Subscription {
        sub_with(
            tenant,
            devices,
            &["temp"],
            kinds,
            Some(ValuePredicate::Above(50.0)),
        )
    }

    /// `acme` also publishes directly, as the broker user `acme-gw`.
    fn tenants() -> Tenants {
        Tenants::from_toml_str(
            "[[tenant]]\nid = \"acme\"\napi_keys = [\"k\"]\namqp_users = [\"acme-gw\"]\n\
             [[tenant]]\nid = \"globex\"\napi_keys = [\"j\"]\n",
        )
        .unwrap()
    }

    fn matcher(subs: Vec<Subscription>, max_events_per_job: usize) -> JobMatcher {
        let mut index = Index::new();
        for s in subs {
            index.insert(s);
        }
        JobMatcher::new(
            crate::sync::SharedIndex::new(index),
            Arc::new(tenants()),
            Limits::default(),
            1000,
            max_events_per_job,
        )
    }

    /// A batch of `acme` readings (device, value) of metric `temp`, timestamped now.
    fn batch(tenant: &str, readings: &[(&str, f64)]) -> (Uuid, Vec<u8>) {
        let mut b = BatchBuilder::new(tenant, "test", 0);
        for (device, x) in readings {
            b.push(device, "temp", now_ns(), *x);
        }
        let batch = b.finish(now_ns());
        (batch.id, codec::encode(&batch).unwrap())
    }

    fn derived(tenant: &str, kind: EventKind, v: u32) -> Vec<u8> {
        DerivedEvent {
            v,
            tenant: tenant.into(),
            event: Event {
                id: "ev-1".into(),
                kind,
                device: "boiler-1".into(),
                metric: "temp".into(),
                t: now_ns(),
                value: Some(90.0),
                detail: Some("stuck".into()),
            },
        }
        .encode()
    }

    #[test]
    fn a_batch_makes_one_job_per_matched_subscription_with_only_its_readings() {
        let boilers = over_50("acme", &["boiler-*"], &[EventKind::Reading]);
        let pumps = over_50("acme", &["pump-*"], &[EventKind::Reading]);
        let other = over_50("globex", &["*"], &[EventKind::Reading]);
        let (boilers_id, pumps_id) = (boilers.id, pumps.id);
        let mut m = matcher(vec![boilers, pumps, other], 1000);
        let readings = [
            ("boiler-1", 70.0),
            ("pump-1", 60.0),
            ("boiler-2", 10.0),
            ("boiler-3", 55.0),
        ];
        let (batch_id, body) = batch("acme", &readings);
        let jobs = m.telemetry(&body, &Publisher::Sluice).unwrap();
        let ids = |j: &Job| j.events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(jobs.len(), 2);
        let b = jobs.iter().find(|j| j.subscription == boilers_id).unwrap();
        assert_eq!(
            ids(b),
            [
                Event::reading_id(batch_id, 0),
                Event::reading_id(batch_id, 3)
            ]
        );
        assert_eq!((b.tenant.as_str(), b.stage), ("acme", Stage::Fresh));
        assert_eq!(b.events[0].device, "boiler-1");
        assert_eq!(b.events[0].value, Some(70.0));
        let p = jobs.iter().find(|j| j.subscription == pumps_id).unwrap();
        assert_eq!(ids(p), [Event::reading_id(batch_id, 1)]);
        // Another tenant's batch never reaches acme's subscriptions.
        let (_, body) = batch("initech", &readings);
        assert!(m.telemetry(&body, &Publisher::Sluice).unwrap().is_empty());
    }

    #[test]
    fn a_job_carries_at_most_max_events_per_job() {
        let all = over_50("acme", &["*"], &[EventKind::Reading]);
        let mut m = matcher(vec![all], 2);
        let (_, body) = batch(
            "acme",
            &[
                ("a", 60.0),
                ("b", 60.0),
                ("c", 60.0),
                ("d", 60.0),
                ("e", 60.0),
            ],
        );
        let sizes: Vec<usize> = m
            .telemetry(&body, &Publisher::Sluice)
            .unwrap()
            .iter()
            .map(|j| j.events.len())
            .collect();
        assert_eq!(sizes, [2, 2, 1]);
    }

    #[test]
    fn unusable_batches_are_refused_with_their_kind() {
        let mut m = matcher(vec![], 1000);
        let r = m.telemetry(b"not msgpack", &Publisher::Sluice).unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Decode, "{r}");
        let mut b = BatchBuilder::new("acme", "test", 0);
        b.push("boiler-1", "temp", now_ns(), f64::NAN);
        let body = codec::encode(&b.finish(now_ns())).unwrap();
        let r = m.telemetry(&body, &Publisher::Sluice).unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Invalid);
        assert!(r.reason.starts_with("invalid batch: "), "{r}");
    }

    #[test]
    fn a_derived_event_matches_subscriptions_of_its_kind_and_tenant() {
        let faults = over_50("acme", &["boiler-*"], &[EventKind::Fault]);
        let readings = over_50("acme", &["boiler-*"], &[EventKind::Reading]);
        let faults_id = faults.id;
        let mut m = matcher(vec![faults, readings], 1000);
        let jobs = m
            .derived(
                &derived("acme", EventKind::Fault, event::FORMAT_VERSION),
                &Publisher::Sluice,
            )
            .unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].subscription, faults_id);
        assert_eq!(jobs[0].events[0].detail.as_deref(), Some("stuck"));
        assert!(
            m.derived(
                &derived("globex", EventKind::Fault, event::FORMAT_VERSION),
                &Publisher::Sluice
            )
            .unwrap()
            .is_empty()
        );
        assert!(
            m.derived(
                &derived("acme", EventKind::Threshold, event::FORMAT_VERSION),
                &Publisher::Sluice
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn unusable_derived_events_are_refused_with_their_kind() {
        let mut m = matcher(vec![], 1000);
        let refused =
            |m: &mut JobMatcher, body: &[u8]| m.derived(body, &Publisher::Sluice).unwrap_err().kind;
        assert_eq!(refused(&mut m, b"\x01\x02"), DeadLetterKind::Decode);
        assert_eq!(
            refused(&mut m, &derived("acme", EventKind::Fault, 99)),
            DeadLetterKind::UnsupportedVersion
        );
        assert_eq!(
            refused(
                &mut m,
                &derived("acme", EventKind::Reading, event::FORMAT_VERSION)
            ),
            DeadLetterKind::Invalid
        );
        assert_eq!(
            refused(
                &mut m,
                &derived("Not A Tenant", EventKind::Fault, event::FORMAT_VERSION)
            ),
            DeadLetterKind::Invalid
        );
    }

    #[test]
    fn a_direct_publisher_is_held_to_its_tenant() {
        let readings = over_50("acme", &["boiler-*"], &[EventKind::Reading]);
        let mut m = matcher(vec![readings], 1000);
        let gw = Publisher::User("acme-gw".into());
        let (_, own) = batch("acme", &[("boiler-1", 70.0)]);
        assert_eq!(m.telemetry(&own, &gw).unwrap().len(), 1);
        let (_, spoofed) = batch("globex", &[("boiler-1", 70.0)]);
        let r = m.telemetry(&spoofed, &gw).unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Forbidden, "{r}");
        let anonymous = m.telemetry(&own, &Publisher::Unknown).unwrap_err();
        assert_eq!(anonymous.kind, DeadLetterKind::Forbidden);
        let forged = derived("globex", EventKind::Fault, event::FORMAT_VERSION);
        assert_eq!(
            m.derived(&forged, &gw).unwrap_err().kind,
            DeadLetterKind::Forbidden
        );
        let fault = derived("acme", EventKind::Fault, event::FORMAT_VERSION);
        assert!(m.derived(&fault, &gw).is_ok());
    }

    #[test]
    fn the_future_skew_is_the_configured_one() {
        let ahead = now_ns() + 90 * 60 * 1_000_000_000;
        let mut b = BatchBuilder::new("acme", "test", 0);
        b.push("boiler-1", "temp", ahead, 70.0);
        let body = codec::encode(&b.finish(now_ns())).unwrap();
        let subs = || vec![over_50("acme", &["boiler-*"], &[EventKind::Reading])];
        // The default hour refuses a reading 90 min ahead; a two-hour bound, as storage
        // may run with, takes it.
        let r = matcher(subs(), 1000)
            .telemetry(&body, &Publisher::Sluice)
            .unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Invalid);
        let mut m = matcher(subs(), 1000);
        m.limits = Limits {
            max_future_ns: 2 * 3600 * 1_000_000_000,
            ..Limits::default()
        };
        assert_eq!(m.telemetry(&body, &Publisher::Sluice).unwrap().len(), 1);
    }
}
