//! Builders the unit tests share.

use sluice_binding::TenantId;
use uuid::Uuid;

use sluice_binding::event::EventKind;

use crate::subscription::{Criteria, Policy, Subscription, Target, ValuePredicate};

/// A subscription of `tenant` with these criteria, to the live feed.
pub(crate) fn sub_with(
    tenant: &str,
    devices: &[&str],
    metrics: &[&str],
    kinds: &[EventKind],
    value: Option<ValuePredicate>,
) -> Subscription {
    Subscription {
        id: Uuid::now_v7(),
        tenant: TenantId::new(tenant).unwrap(),
        name: None,
        criteria: Criteria {
            devices: devices.iter().map(|s| s.to_string()).collect(),
            metrics: metrics.iter().map(|s| s.to_string()).collect(),
            kinds: kinds.to_vec(),
            value,
        },
        policy: Policy::default(),
        target: Target::Live,
        created: 0,
    }
}

/// A subscription of `tenant`'s readings, to the live feed.
pub(crate) fn sub(tenant: &str, devices: &[&str], metrics: &[&str]) -> Subscription {
    sub_with(tenant, devices, metrics, &[EventKind::Reading], None)
}
