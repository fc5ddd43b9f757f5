//! Helpers shared by the index and matcher tests.

use sluice_binding::BatchView;
use uuid::Uuid;

use super::{BatchMatches, Index, SubRef};
pub(super) use crate::testing::{sub, sub_with};
use sluice_binding::event::EventKind;

pub(super) fn ids(subs: &[SubRef]) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = subs.iter().map(|s| s.id).collect();
    ids.sort();
    ids
}

pub(super) fn cands(index: &Index, tenant: &str, kind: EventKind, d: &str, m: &str) -> Vec<Uuid> {
    let mut out = Vec::new();
    index.candidates(tenant, kind, d, m, &mut out);
    let n = out.len();
    let ids = ids(&out);
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        n
    );
    ids
}

pub(super) fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

/// A batch view over borrowed names: readings are (device, metric, value).
pub(super) fn view<'a>(
    tenant: &'a str,
    devices: &[&'a str],
    metrics: &[&'a str],
    readings: &[(u32, u32, f64)],
) -> BatchView<'a> {
    BatchView {
        v: 1,
        id: Uuid::now_v7(),
        producer: "test",
        seq: 0,
        created: 0,
        tenant,
        devices: devices.to_vec(),
        metrics: metrics.to_vec(),
        d: readings.iter().map(|r| r.0).collect(),
        m: readings.iter().map(|r| r.1).collect(),
        t: (0..readings.len() as i64).collect(),
        x: readings.iter().map(|r| r.2).collect(),
    }
}

pub(super) fn matched(m: &BatchMatches, id: Uuid) -> Vec<u32> {
    m.per_subscription
        .iter()
        .find(|(s, _)| s.id == id)
        .map(|(_, r)| r.clone())
        .unwrap_or_default()
}
