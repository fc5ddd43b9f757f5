//! Each tenant's ingest quota (the tenants file's `quota`, [`Quota`]): readings a second
//! and body bytes a second, each a token bucket (governor's GCRA) refilled at its rate and
//! holding one second of it. The HTTP front end spends them (refusing what does not fit)
//! and so does the gate (`crate::gate`, waiting until it fits): a tenant's rate covers
//! both ways in.
//!
//! Bytes are spent before the body is read when the request declares its length
//! (`Content-Length`), else once it is read; readings once it is parsed. A refused request
//! publishes nothing and gets 429 with the time until the bucket holds enough
//! (`Retry-After`); a request larger than a whole second of its tenant's rate can never fit
//! and gets 413. A refusal also *holds* the tenant until then: its requests in that time
//! are refused before their bodies are read or parsed, so a tenant far over its quota
//! costs ingest little more than the requests it is allowed (issue #9, hole 5). The buckets
//! are per ingest process: with several behind a load balancer a tenant's rate is their
//! sum.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// The last refusal: until when (ns since [`Quotas::epoch`]) the tenant is held, and
    /// what refused it.
    held: Hold,
}

/// Until when a tenant's requests are refused unread, and which rate refused the last one.
#[derive(Debug, Default)]
struct Hold {
    /// ns since the epoch; 0: not held.
    until: AtomicU64,
    /// 0: `readings_per_sec`, 1: `bytes_per_sec`.
    which: AtomicU8,
}

/// The buckets of every tenant with a quota.
#[derive(Debug)]
pub(crate) struct Quotas {
    tenants: HashMap<TenantId, TenantBuckets>,
    /// The origin of the holds' clock.
    epoch: Instant,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            tenants: HashMap::new(),
            epoch: Instant::now(),
        }
    }
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
                    held: Hold::default(),
                };
                (b.readings.is_some() || b.bytes.is_some()).then(|| (t.clone(), b))
            })
            .collect();
        Self {
            tenants,
            epoch: Instant::now(),
        }
    }

    /// Refuses `tenant`'s request unread while a refusal holds it: until its bucket would
    /// hold the refused request. A smaller request might fit sooner; it is the tenant's
    /// own, and it is over its rate.
    pub(crate) fn check_held(&self, tenant: &TenantId) -> Result<(), OverQuota> {
        let Some(b) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let until = b.held.until.load(Ordering::Relaxed);
        let now = self.now_ns();
        if until <= now {
            return Ok(());
        }
        let (which, bucket) = match b.held.which.load(Ordering::Relaxed) {
            0 => ("readings_per_sec", b.readings.as_ref()),
            _ => ("bytes_per_sec", b.bytes.as_ref()),
        };
        Err(OverQuota {
            which,
            rate: bucket.map_or(0, |b| b.rate),
            wait: Some(Duration::from_nanos(until - now)),
        })
    }

    /// Spends `bytes` of `tenant`'s byte rate.
    pub(crate) fn spend_bytes(&self, tenant: &TenantId, bytes: usize) -> Result<(), OverQuota> {
        self.spend(tenant, 1, bytes)
    }

    /// Spends `readings` of `tenant`'s reading rate.
    pub(crate) fn spend_readings(
        &self,
        tenant: &TenantId,
        readings: usize,
    ) -> Result<(), OverQuota> {
        self.spend(tenant, 0, readings)
    }

    /// Spends `n` of the rate `which` (0 readings, 1 bytes); a refusal that can be retried
    /// holds the tenant until then.
    fn spend(&self, tenant: &TenantId, which: u8, n: usize) -> Result<(), OverQuota> {
        let Some(b) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let (name, bucket) = match which {
            0 => ("readings_per_sec", b.readings.as_ref()),
            _ => ("bytes_per_sec", b.bytes.as_ref()),
        };
        let Some(bucket) = bucket else {
            return Ok(());
        };
        bucket.spend(n).map_err(|wait| {
            if let Some(wait) = wait {
                let until = self.now_ns().saturating_add(nanos(wait)).max(1);
                b.held.which.store(which, Ordering::Relaxed);
                b.held.until.fetch_max(until, Ordering::Relaxed);
            }
            OverQuota {
                which: name,
                rate: bucket.rate,
                wait,
            }
        })
    }

    /// Waits until `tenant`'s buckets hold `readings` and `bytes`, and spends them. What
    /// a bucket could never hold (more than a second of its rate) costs a whole second of
    /// it, then `Err` as [`OverQuota`] with no wait: the gate refuses that message, and
    /// refusing it took as long as the tenant's rate allows, so a flood of refusals is
    /// held to the quota too. Waiters of one tenant share its rate; other tenants' are
    /// untouched.
    pub(crate) async fn wait(
        &self,
        tenant: &TenantId,
        readings: usize,
        bytes: usize,
    ) -> Result<(), OverQuota> {
        let Some(b) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let mut never = None;
        for (which, bucket, n) in [
            ("readings_per_sec", &b.readings, readings),
            ("bytes_per_sec", &b.bytes, bytes),
        ] {
            let Some(bucket) = bucket else { continue };
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            if n > bucket.burst {
                never.get_or_insert(OverQuota {
                    which,
                    rate: bucket.rate,
                    wait: None,
                });
            }
            if let Some(cells) = NonZeroU32::new(n.min(bucket.burst)) {
                // Cannot fail: at most the burst.
                let _ = bucket.limiter.until_n_ready(cells).await;
            }
        }
        never.map_or(Ok(()), Err)
    }

    fn now_ns(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
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
    fn a_refusal_holds_the_tenant_until_its_bucket_would_hold_the_request() {
        let q = Quotas::new(&tenants("{ readings_per_sec = 1000 }"));
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        q.check_held(&a).unwrap();
        q.spend_readings(&a, 1000).unwrap();
        // Not held by a spend that passed.
        q.check_held(&a).unwrap();
        let refused = q.spend_readings(&a, 100).unwrap_err().wait.unwrap();
        // Held: even a request the bucket might take is refused unread, for as long.
        let held = q.check_held(&a).unwrap_err();
        assert_eq!((held.which, held.rate), ("readings_per_sec", 1000));
        let wait = held.wait.unwrap();
        assert!(
            wait <= refused && wait > refused / 2,
            "{held:?} {refused:?}"
        );
        // Another tenant, and a tenant without a quota, are never held.
        q.check_held(&b).unwrap();
        std::thread::sleep(refused + Duration::from_millis(5));
        q.check_held(&a).unwrap();
        q.spend_readings(&a, 100).unwrap();
        // A request that can never fit holds nothing: the client is told to split it.
        assert_eq!(q.spend_readings(&a, 1001).unwrap_err().wait, None);
        q.check_held(&a).unwrap();
    }

    #[tokio::test]
    async fn the_gate_waits_for_its_rate_and_is_refused_what_never_fits() {
        let q = Quotas::new(&tenants(
            "{ readings_per_sec = 100, bytes_per_sec = 10000 }",
        ));
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        // A second's worth at once, then each 10 readings about 0.1 s apart.
        let started = Instant::now();
        q.wait(&a, 100, 100).await.unwrap();
        q.wait(&a, 10, 100).await.unwrap();
        q.wait(&a, 10, 100).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
        // Spent, as HTTP sees it.
        assert!(q.spend_readings(&a, 50).is_err());
        // Never fits: refused, after a whole second of the rate was spent on it.
        let before = Instant::now();
        let never = q.wait(&a, 101, 1).await.unwrap_err();
        assert_eq!((never.which, never.wait), ("readings_per_sec", None));
        assert!(
            before.elapsed() >= Duration::from_millis(900),
            "{:?}",
            before.elapsed()
        );
        let never = q.wait(&a, 1, 10_001).await.unwrap_err();
        assert_eq!(never.which, "bytes_per_sec");
        // Another tenant, without a quota, has no bucket to wait for.
        q.wait(&b, 1_000_000, 1_000_000).await.unwrap();
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
