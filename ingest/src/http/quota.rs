//! Each tenant's ingest quota (the tenants file's `quota`, [`Quota`]): readings a second
//! and body bytes a second, each a token bucket (governor's GCRA) refilled at its rate and
//! holding one second of it.
//!
//! Bytes are spent once the body is read (before it is parsed: a tenant over its byte
//! rate costs no parsing), readings once it is parsed. A refused request publishes nothing
//! and gets 429 with the time until the bucket holds enough (`Retry-After`); a request
//! larger than a whole second of its tenant's rate can never fit and gets 413. The buckets
//! are per ingest process: with several behind a load balancer a tenant's rate is their
//! sum.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota as Gcra, RateLimiter};
use sluice_binding::TenantId;
use sluice_binding::tenancy::{Quota, Tenants};

/// What a tenant's quota refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OverQuota {
    /// `readings_per_sec` or `bytes_per_sec`.
    pub(crate) which: &'static str,
    /// The tenant's rate.
    pub(crate) rate: u64,
    /// Until the bucket holds what the request needs; `None`: it never will (the request
    /// is larger than a second of the rate).
    pub(crate) wait: Option<Duration>,
}

/// One rate.
#[derive(Debug)]
struct Bucket {
    limiter: DefaultDirectRateLimiter,
    rate: u64,
    burst: u32,
}

impl Bucket {
    /// `rate` a second, holding a second of it; `None` for 0 (unlimited).
    fn new(rate: u64) -> Option<Self> {
        let per_sec = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX))?;
        Some(Self {
            limiter: RateLimiter::direct(Gcra::per_second(per_sec)),
            rate,
            burst: per_sec.get(),
        })
    }

    /// Spends `n`, or says how long until it could be spent (spending nothing); `None`
    /// when it never could.
    fn spend(&self, n: usize) -> Result<(), Option<Duration>> {
        let Some(cells) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        if cells.get() > self.burst {
            return Err(None);
        }
        match self.limiter.check_n(cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            Err(_) => Err(None),
        }
    }
}

#[derive(Debug)]
struct TenantBuckets {
    readings: Option<Bucket>,
    bytes: Option<Bucket>,
}

/// The buckets of every tenant with a quota.
#[derive(Debug, Default)]
pub(crate) struct Quotas {
    tenants: HashMap<TenantId, TenantBuckets>,
}

impl Quotas {
    /// Buckets for every tenant of `tenants` with a quota.
    pub(crate) fn new(tenants: &Tenants) -> Self {
        let tenants = tenants
            .ids()
            .iter()
            .filter_map(|t| {
                let Quota {
                    readings_per_sec,
                    bytes_per_sec,
                } = tenants.quota(t);
                let b = TenantBuckets {
                    readings: Bucket::new(readings_per_sec),
                    bytes: Bucket::new(bytes_per_sec),
                };
                (b.readings.is_some() || b.bytes.is_some()).then(|| (t.clone(), b))
            })
            .collect();
        Self { tenants }
    }

    /// Spends `bytes` of `tenant`'s byte rate.
    pub(crate) fn spend_bytes(&self, tenant: &TenantId, bytes: usize) -> Result<(), OverQuota> {
        Self::spend(
            self.tenants.get(tenant).and_then(|b| b.bytes.as_ref()),
            "bytes_per_sec",
            bytes,
        )
    }

    /// Spends `readings` of `tenant`'s reading rate.
    pub(crate) fn spend_readings(
        &self,
        tenant: &TenantId,
        readings: usize,
    ) -> Result<(), OverQuota> {
        Self::spend(
            self.tenants.get(tenant).and_then(|b| b.readings.as_ref()),
            "readings_per_sec",
            readings,
        )
    }

    fn spend(bucket: Option<&Bucket>, which: &'static str, n: usize) -> Result<(), OverQuota> {
        match bucket {
            None => Ok(()),
            Some(b) => b.spend(n).map_err(|wait| OverQuota {
                which,
                rate: b.rate,
                wait,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(quota: &str) -> Tenants {
        Tenants::from_toml_str(&format!(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"ka\"]\nquota = {quota}\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"kb\"]\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_second_of_readings_passes_then_the_rest_waits_and_others_are_untouched() {
        let q = Quotas::new(&tenants("{ readings_per_sec = 100 }"));
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        for _ in 0..10 {
            q.spend_readings(&a, 10).unwrap();
        }
        let over = q.spend_readings(&a, 10).unwrap_err();
        assert_eq!((over.which, over.rate), ("readings_per_sec", 100));
        let wait = over.wait.unwrap();
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{over:?}"
        );
        // A refused request spends nothing: one reading fits once the refill allows.
        std::thread::sleep(Duration::from_millis(15));
        q.spend_readings(&a, 1).unwrap();
        // No byte quota for a, no quota at all for b.
        q.spend_bytes(&a, usize::MAX).unwrap();
        for _ in 0..100 {
            q.spend_readings(&b, 10_000).unwrap();
        }
    }

    #[test]
    fn a_request_larger_than_a_second_of_the_rate_never_fits() {
        let q = Quotas::new(&tenants("{ bytes_per_sec = 1000 }"));
        let a = TenantId::new("a").unwrap();
        let over = q.spend_bytes(&a, 1001).unwrap_err();
        assert_eq!((over.which, over.wait), ("bytes_per_sec", None));
        q.spend_bytes(&a, 1000).unwrap();
    }
}
