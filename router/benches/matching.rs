//! Criterion benchmark of the matching engine: `Matcher::match_batch` on 500-reading
//! batches against indexes of 1 000, 10 000 and 100 000 subscriptions.
//!
//! Subscriptions are spread over 10 tenants, each with 100 sites × 100 devices
//! (`site-042-dev-0173`) and 100 metrics (`m-017`): 60 % on one exact device (half of
//! them on one metric, half on `*`), 25 % on a site prefix (`site-042-*`) and one metric,
//! 10 % metric-only (device `*`, one metric or a metric prefix `m-01*` covering ten
//! metrics), 5 % on one exact device and metric with a value predicate (above, below,
//! outside, changed_by). Batches draw 500 readings from a pool of 100 to 1000 of one
//! tenant's devices × 3 metrics, as a producer's batch would.
//!
//! The density of matches grows with the subscription count (the bench prints it per
//! size): about 0.5, 6 and 57 matching subscriptions per reading at 1 000, 10 000 and
//! 100 000, most of them metric-prefix ones. At 100 000 the figure is bound by producing
//! the matches, not by finding the candidates.
//!
//! Batches are built as `sluice_binding::Batch`, encoded with `codec::encode` and decoded
//! with `codec::decode` once, outside the measured loop: the figure is matching alone
//! (`bench/benches/hot_path.rs` measures decoding). Throughput is in readings, so
//! criterion reports readings per second on one core.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_binding::event::EventKind;
use sluice_binding::model::BatchBuilder;
use sluice_binding::{TenantId, codec};
use sluice_router::matching::{Index, Matcher};
use sluice_router::subscription::{Criteria, Policy, Subscription, Target, ValuePredicate};
use uuid::Uuid;

const TENANTS: usize = 10;
const SITES: usize = 100;
const DEVICES_PER_SITE: usize = 100;
const METRICS: usize = 100;
const READINGS: usize = 500;
const BATCHES: usize = 40;

fn tenant(t: usize) -> String {
    format!("tenant-{t}")
}

fn device(site: usize, dev: usize) -> String {
    format!("site-{site:03}-dev-{dev:04}")
}

fn metric(m: usize) -> String {
    format!("m-{m:03}")
}

fn subscription(rng: &mut StdRng) -> Subscription {
    let t = rng.random_range(0..TENANTS);
    let site = rng.random_range(0..SITES);
    let dev = device(site, rng.random_range(0..DEVICES_PER_SITE));
    let one_metric = metric(rng.random_range(0..METRICS));
    let roll = rng.random_range(0..100);
    let (devices, metrics, value) = match roll {
        0..60 => {
            let m = if rng.random_bool(0.5) {
                one_metric
            } else {
                "*".to_owned()
            };
            (dev, m, None)
        }
        60..85 => (format!("site-{site:03}-*"), one_metric, None),
        85..95 => {
            let m = if rng.random_bool(0.5) {
                one_metric
            } else {
                // `m-01*`: ten metrics.
                format!("m-{:02}*", rng.random_range(0..10))
            };
            ("*".to_owned(), m, None)
        }
        _ => {
            let v = match rng.random_range(0..4) {
                0 => ValuePredicate::Above(90.0),
                1 => ValuePredicate::Below(10.0),
                2 => ValuePredicate::Outside(5.0, 95.0),
                _ => ValuePredicate::ChangedBy(20.0),
            };
            (dev, one_metric, Some(v))
        }
    };
    Subscription {
        id: Uuid::now_v7(),
        tenant: TenantId::new(tenant(t)).expect("tenant id"),
        name: None,
        criteria: Criteria {
            devices: vec![devices],
            metrics: vec![metrics],
            kinds: vec![EventKind::Reading],
            value,
        },
        policy: Policy::default(),
        target: Target::Live,
        created: 0,
    }
}

fn index(subscriptions: usize, rng: &mut StdRng) -> Index {
    let mut ix = Index::new();
    for _ in 0..subscriptions {
        ix.insert(subscription(rng));
    }
    ix
}

/// Encoded batches, round robin over the tenants.
fn bodies(rng: &mut StdRng) -> Vec<Vec<u8>> {
    (0..BATCHES)
        .map(|k| {
            let t = tenant(k % TENANTS);
            let pool: Vec<String> = (0..rng.random_range(100..=1000))
                .map(|_| {
                    device(
                        rng.random_range(0..SITES),
                        rng.random_range(0..DEVICES_PER_SITE),
                    )
                })
                .collect();
            let first_metric = rng.random_range(0..METRICS - 3);
            let mut b = BatchBuilder::with_capacity(&t, "bench", k as u64, READINGS);
            for i in 0..READINGS {
                let d = &pool[rng.random_range(0..pool.len())];
                let m = metric(first_metric + rng.random_range(0..3));
                b.push(d, &m, i as i64, rng.random_range(0.0..100.0));
            }
            codec::encode(&b.finish(0)).expect("encode")
        })
        .collect()
}

fn matching(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let bodies = bodies(&mut rng);
    let batches: Vec<_> = bodies
        .iter()
        .map(|b| codec::decode(b).expect("decode"))
        .collect();
    let mut g = c.benchmark_group("matching");
    g.throughput(Throughput::Elements(READINGS as u64));
    for n in [1_000, 10_000, 100_000] {
        let ix = index(n, &mut rng);
        let mut matcher = Matcher::new(1_000_000);
        // The matches each batch yields, so the figures can be read against the output
        // the matcher must produce.
        let matches: usize = batches
            .iter()
            .map(|b| {
                matcher
                    .match_batch(&ix, b)
                    .per_subscription
                    .iter()
                    .map(|(_, r)| r.len())
                    .sum::<usize>()
            })
            .sum();
        eprintln!(
            "matching/subscriptions/{n}: {:.0} (reading, subscription) matches per {READINGS}-reading batch",
            matches as f64 / batches.len() as f64
        );
        let mut k = 0;
        g.bench_function(BenchmarkId::new("subscriptions", n), |b| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                black_box(matcher.match_batch(&ix, &batches[k]))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
