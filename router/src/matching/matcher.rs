//! The matcher: runs batches of readings and single events through the [`Index`], and
//! remembers the previous value of each series for `changed_by`.

use std::collections::HashMap;

use sluice_binding::BatchView;

use super::index::{Index, SubRef, kind_ix};
use sluice_binding::event::EventKind;

use crate::subscription::ValuePredicate;

/// What one batch matched: per subscription, the indexes of the readings that matched
/// (ascending). Subscriptions appear in the order of their first match, once each.
#[derive(Debug, Default)]
pub struct BatchMatches {
    /// (subscription, indexes of the matching readings in the batch).
    pub per_subscription: Vec<(SubRef, Vec<u32>)>,
}

/// "None" in the scratch tables.
const NONE: u32 = u32::MAX;

/// Pairs are found with a flat device × metric table while it has at most this many
/// entries (16 KiB), or 4 per reading; with larger dictionaries, with a hash map.
const DENSE_PAIRS: usize = 4096;

/// Matches batches of readings (kind `reading`) and single events, and keeps the previous
/// value of each series that a `changed_by` candidate watches.
///
/// A series is (tenant, kind, device, metric): readings form one series per device and
/// metric, and derived events of another kind never disturb it. At most `max_series`
/// previous values are remembered ([`SeriesMemory`]).
#[derive(Debug)]
pub struct Matcher {
    previous: SeriesMemory,
    scratch: Scratch,
}

/// The previous value of each watched series, per tenant, at most `max` in all. When a new
/// series would exceed the bound, the tenant holding the most series forgets all of its
/// own, and the clearing is counted ([`Matcher::series_cleared`]): the next value of each
/// of its series does not match `changed_by` (as for a series seen for the first time).
/// A tenant watching very many series so clears its own memory, never another tenant's
/// (unless that one holds more). Clearing a whole tenant keeps the memory bounded without
/// per-entry bookkeeping on the hot path; a bound sized above the live series count makes
/// it a rare event.
#[derive(Debug)]
struct SeriesMemory {
    max: usize,
    len: usize,
    by_tenant: HashMap<Box<str>, HashMap<Box<[u8]>, f64>>,
    cleared: u64,
}

impl SeriesMemory {
    fn get(&self, tenant: &str, key: &[u8]) -> Option<f64> {
        self.by_tenant.get(tenant)?.get(key).copied()
    }

    fn remember(&mut self, tenant: &str, key: &[u8], x: f64) {
        if let Some(v) = self.by_tenant.get_mut(tenant).and_then(|m| m.get_mut(key)) {
            *v = x;
            return;
        }
        if self.len >= self.max {
            // Only when full: a walk over the tenants, not over their series.
            let largest = self
                .by_tenant
                .iter()
                .max_by_key(|(_, m)| m.len())
                .map(|(t, _)| t.clone());
            if let Some(t) = largest
                && let Some(m) = self.by_tenant.remove(&t)
            {
                self.len -= m.len();
                self.cleared += 1;
                tracing::debug!(max_series = self.max, tenant = %t, series = m.len(), "series memory full, cleared the largest tenant's");
            }
        }
        // The tenant's name is copied only for its first series.
        if let Some(series) = self.by_tenant.get_mut(tenant) {
            series.insert(key.into(), x);
        } else {
            let series = HashMap::from([(Box::<[u8]>::from(key), x)]);
            self.by_tenant.insert(tenant.into(), series);
        }
        self.len += 1;
    }
}

/// Buffers reused from batch to batch.
#[derive(Debug, Default)]
struct Scratch {
    key: Vec<u8>,
    slots: Vec<u32>,
    /// Per reading: its pair, or `NONE` for an index outside the dictionaries.
    pair_of: Vec<u32>,
    dense: Vec<u32>,
    sparse: HashMap<u64, u32>,
    pairs: Vec<Pair>,
    cands: Vec<Cand>,
    /// Slot → (batch generation, position in the result): stamped rather than cleared,
    /// so a batch costs nothing for the slots it does not touch.
    slot_out: Vec<(u32, u32)>,
    generation: u32,
}

/// A distinct (device, metric) pair of a batch: one series.
#[derive(Debug)]
struct Pair {
    d: u32,
    m: u32,
    /// Range of `Scratch::cands`.
    cands: (u32, u32),
    /// Whether a `changed_by` candidate watches the series.
    tracked: bool,
    prev: Option<f64>,
}

/// A candidate subscription of a pair.
#[derive(Debug)]
struct Cand {
    slot: u32,
    /// Position in the result, once the subscription matched something.
    out: u32,
    pred: Option<ValuePredicate>,
}

impl Matcher {
    /// A matcher remembering at most `max_series` previous values (at least 1); when a new
    /// series would exceed the bound, the memory is cleared and the clearing counted.
    pub fn new(max_series: usize) -> Self {
        Self {
            previous: SeriesMemory {
                max: max_series.max(1),
                len: 0,
                by_tenant: HashMap::new(),
                cleared: 0,
            },
            scratch: Scratch::default(),
        }
    }

    /// How many times a tenant's series memory was cleared for exceeding the bound.
    pub fn series_cleared(&self) -> u64 {
        self.previous.cleared
    }

    /// How many series have a remembered previous value.
    pub fn series_len(&self) -> usize {
        self.previous.len
    }

    /// Matches a batch of readings. Candidates are looked up once per distinct (device,
    /// metric) pair of the batch; each reading then costs only its candidates' value
    /// predicates. Readings whose device or metric index falls outside the dictionaries
    /// (validation refuses such batches) are skipped.
    pub fn match_batch(&mut self, index: &Index, batch: &BatchView<'_>) -> BatchMatches {
        let mut out: Vec<(SubRef, Vec<u32>)> = Vec::new();
        let Some(tenant) = index.tenants.get(batch.tenant) else {
            return BatchMatches::default();
        };
        let Self {
            previous,
            scratch: s,
        } = self;
        let n = batch.d.len().min(batch.m.len()).min(batch.x.len());
        let (nd, nm) = (batch.devices.len(), batch.metrics.len());
        s.pairs.clear();
        s.cands.clear();
        s.pair_of.clear();
        s.generation = s.generation.wrapping_add(1);
        if s.generation == 0 {
            s.slot_out.clear();
            s.generation = 1;
        }
        if s.slot_out.len() < tenant.slots.len() {
            s.slot_out.resize(tenant.slots.len(), (0, 0));
        }

        // 1. Distinct pairs, from the dictionary indexes (no string hashing).
        let dense = nd
            .checked_mul(nm)
            .is_some_and(|c| c <= DENSE_PAIRS.max(4 * n));
        if dense {
            s.dense.clear();
            s.dense.resize(nd * nm, NONE);
        } else {
            s.sparse.clear();
        }
        for i in 0..n {
            let (d, m) = (batch.d[i], batch.m[i]);
            if d as usize >= nd || m as usize >= nm {
                s.pair_of.push(NONE);
                continue;
            }
            let p = if dense {
                &mut s.dense[d as usize * nm + m as usize]
            } else {
                s.sparse
                    .entry((u64::from(d) << 32) | u64::from(m))
                    .or_insert(NONE)
            };
            if *p == NONE {
                *p = s.pairs.len() as u32;
                s.pairs.push(Pair {
                    d,
                    m,
                    cands: (0, 0),
                    tracked: false,
                    prev: None,
                });
            }
            s.pair_of.push(*p);
        }

        // 2. Candidates of each pair, once.
        for pair in &mut s.pairs {
            let device = batch.devices[pair.d as usize];
            let metric = batch.metrics[pair.m as usize];
            s.slots.clear();
            tenant.lookup(EventKind::Reading, device, metric, &mut s.slots);
            let start = s.cands.len() as u32;
            for &slot in &s.slots {
                let e = tenant.entry(slot);
                pair.tracked |= e.watches_changes();
                s.cands.push(Cand {
                    slot,
                    out: NONE,
                    pred: e.value,
                });
            }
            pair.cands = (start, s.cands.len() as u32);
            if pair.tracked {
                series_key(&mut s.key, EventKind::Reading, device, metric);
                pair.prev = previous.get(batch.tenant, &s.key);
            }
        }

        // 3. Readings in batch order: value predicates only. Batch order keeps each
        // subscription's indexes ascending and each series' previous value in sequence.
        for (i, &p) in s.pair_of.iter().enumerate() {
            if p == NONE {
                continue;
            }
            let pair = &mut s.pairs[p as usize];
            let x = batch.x[i];
            for c in &mut s.cands[pair.cands.0 as usize..pair.cands.1 as usize] {
                if !c.pred.is_none_or(|pred| pred.holds(x, pair.prev)) {
                    continue;
                }
                if c.out == NONE {
                    let o = &mut s.slot_out[c.slot as usize];
                    if o.0 != s.generation {
                        *o = (s.generation, out.len() as u32);
                        out.push((tenant.entry(c.slot).sub.clone(), Vec::new()));
                    }
                    c.out = o.1;
                }
                out[c.out as usize].1.push(i as u32);
            }
            if pair.tracked {
                pair.prev = Some(x);
            }
        }

        // 4. Remember the last value of each watched series.
        for pair in &s.pairs {
            if let (true, Some(x)) = (pair.tracked, pair.prev) {
                let (device, metric) = (
                    batch.devices[pair.d as usize],
                    batch.metrics[pair.m as usize],
                );
                series_key(&mut s.key, EventKind::Reading, device, metric);
                previous.remember(batch.tenant, &s.key, x);
            }
        }
        BatchMatches {
            per_subscription: out,
        }
    }

    /// Matches one event of any kind (derived events from the events exchange); the
    /// previous value for `changed_by` is that of the same tenant, kind, device and
    /// metric, as for batches.
    pub fn match_event(
        &mut self,
        index: &Index,
        tenant: &str,
        kind: EventKind,
        device: &str,
        metric: &str,
        value: f64,
    ) -> Vec<SubRef> {
        let Some(t) = index.tenants.get(tenant) else {
            return Vec::new();
        };
        let s = &mut self.scratch;
        s.slots.clear();
        t.lookup(kind, device, metric, &mut s.slots);
        let tracked = s.slots.iter().any(|slot| t.entry(*slot).watches_changes());
        let prev = if tracked {
            series_key(&mut s.key, kind, device, metric);
            self.previous.get(tenant, &s.key)
        } else {
            None
        };
        let matched = s
            .slots
            .iter()
            .map(|slot| t.entry(*slot))
            .filter(|e| e.value.is_none_or(|p| p.holds(value, prev)))
            .map(|e| e.sub.clone())
            .collect();
        if tracked {
            self.previous.remember(tenant, &s.key, value);
        }
        matched
    }
}

/// The memory key of a series within its tenant's memory: kind, device, metric. 0xFF never
/// occurs in UTF-8, so the separator makes the key unambiguous whatever the names contain.
fn series_key(key: &mut Vec<u8>, kind: EventKind, device: &str, metric: &str) {
    key.clear();
    key.push(kind_ix(kind) as u8);
    key.extend_from_slice(device.as_bytes());
    key.push(0xFF);
    key.extend_from_slice(metric.as_bytes());
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::matching::test_support::*;

    /// A batch matches as its readings would one by one, in order (changed_by included).
    #[test]
    fn batches_agree_with_single_events() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        let mut ix = Index::new();
        let preds = [
            None,
            Some(ValuePredicate::Above(5.0)),
            Some(ValuePredicate::Below(2.0)),
            Some(ValuePredicate::Outside(3.0, 6.0)),
            Some(ValuePredicate::ChangedBy(3.0)),
        ];
        for device in ["d-1", "d-*", "*"] {
            for metric in ["a", "b", "*"] {
                for value in preds {
                    ix.insert(sub_with(
                        "acme",
                        &[device],
                        &[metric],
                        &[EventKind::Reading],
                        value,
                    ));
                }
            }
        }
        let devices = ["d-1", "d-2", "e-1"];
        let metrics = ["a", "b"];
        let (mut batched, mut single) = (Matcher::new(100), Matcher::new(100));
        for _ in 0..3 {
            let readings: Vec<(u32, u32, f64)> = (0..60)
                .map(|_| {
                    (
                        rng.random_range(0..3),
                        rng.random_range(0..2),
                        rng.random_range(0.0..10.0),
                    )
                })
                .collect();
            let got = batched.match_batch(&ix, &view("acme", &devices, &metrics, &readings));
            let mut want: HashMap<Uuid, Vec<u32>> = HashMap::new();
            for (i, (d, m, x)) in readings.iter().enumerate() {
                let r = EventKind::Reading;
                let (d, m) = (devices[*d as usize], metrics[*m as usize]);
                for s in single.match_event(&ix, "acme", r, d, m, *x) {
                    want.entry(s.id).or_default().push(i as u32);
                }
            }
            assert_eq!(got.per_subscription.len(), want.len());
            for (s, r) in &got.per_subscription {
                assert_eq!(Some(r), want.get(&s.id));
            }
        }
    }

    #[test]
    fn value_predicates_in_batches() {
        let mut ix = Index::new();
        let plain = sub("acme", &["boiler-1"], &["temp"]);
        let p = |v| sub_with("acme", &["boiler-*"], &["temp"], &[EventKind::Reading], v);
        let above = p(Some(ValuePredicate::Above(10.0)));
        let below = p(Some(ValuePredicate::Below(0.0)));
        let outside = p(Some(ValuePredicate::Outside(0.0, 10.0)));
        let changed = p(Some(ValuePredicate::ChangedBy(2.0)));
        let ids = [&plain, &above, &below, &outside, &changed].map(|s| s.id);
        for s in [plain, above, below, outside, changed] {
            ix.insert(s);
        }
        let [plain, above, below, outside, changed] = ids;
        let mut m = Matcher::new(1000);
        // boiler-1: 5, 11, -1, 0.5, 0.4 ; boiler-2: 20, 21 (interleaved).
        let b1 = view(
            "acme",
            &["boiler-1", "boiler-2"],
            &["temp", "hum"],
            &[
                (0, 0, 5.0),
                (1, 0, 20.0),
                (0, 0, 11.0),
                (0, 1, 99.0),
                (0, 0, -1.0),
                (1, 0, 21.0),
                (0, 0, 0.5),
            ],
        );
        let got = m.match_batch(&ix, &b1);
        assert_eq!(matched(&got, plain), [0, 2, 4, 6]);
        assert_eq!(matched(&got, above), [1, 2, 5]);
        assert_eq!(matched(&got, below), [4]);
        assert_eq!(matched(&got, outside), [1, 2, 4, 5]);
        // First value of each series has nothing to compare with; 5→11, 11→-1 change by
        // more than 2, -1→0.5 does not; boiler-2 20→21 does not.
        assert_eq!(matched(&got, changed), [2, 4]);
        assert_eq!(got.per_subscription.len(), 5);
        assert_eq!(m.series_len(), 2);

        // Across batches: boiler-1 was last 0.5, boiler-2 21; dictionaries differ.
        let b2 = view(
            "acme",
            &["boiler-2", "boiler-1"],
            &["temp"],
            &[(1, 0, 3.0), (0, 0, 21.5), (1, 0, 3.1), (0, 0, 30.0)],
        );
        let got = m.match_batch(&ix, &b2);
        assert_eq!(matched(&got, changed), [0, 3]);
        assert_eq!(matched(&got, plain), [0, 2]);
    }

    #[test]
    fn changed_by_in_single_events() {
        let mut ix = Index::new();
        let s = sub_with(
            "acme",
            &["*"],
            &["score"],
            &[EventKind::Fault, EventKind::Reading],
            Some(ValuePredicate::ChangedBy(1.0)),
        );
        let id = s.id;
        ix.insert(s);
        let mut m = Matcher::new(10);
        let f = EventKind::Fault;
        assert!(m.match_event(&ix, "acme", f, "d", "score", 1.0).is_empty());
        assert_eq!(ids(&m.match_event(&ix, "acme", f, "d", "score", 3.0)), [id]);
        assert!(m.match_event(&ix, "acme", f, "d", "score", 3.5).is_empty());
        // Readings of the same device and metric are another series.
        let r = EventKind::Reading;
        assert!(m.match_event(&ix, "acme", r, "d", "score", 10.0).is_empty());
        assert!(m.match_event(&ix, "acme", f, "d", "score", 4.0).is_empty());
        // The reading series is shared with batches.
        let b = view("acme", &["d"], &["score"], &[(0, 0, 12.0)]);
        assert_eq!(matched(&m.match_batch(&ix, &b), id), [0]);
    }

    #[test]
    fn series_memory_is_bounded() {
        let mut ix = Index::new();
        let s = sub_with(
            "acme",
            &["*"],
            &["t"],
            &[EventKind::Reading],
            Some(ValuePredicate::ChangedBy(0.0)),
        );
        ix.insert(s);
        let mut m = Matcher::new(2);
        let b = view(
            "acme",
            &["a", "b", "c"],
            &["t"],
            &[(0, 0, 1.0), (1, 0, 1.0), (2, 0, 1.0)],
        );
        m.match_batch(&ix, &b);
        assert_eq!((m.series_len(), m.series_cleared()), (1, 1));
        // Only `c` was remembered after the clearing.
        let b = view("acme", &["a", "c"], &["t"], &[(0, 0, 2.0), (1, 0, 2.0)]);
        let got = m.match_batch(&ix, &b);
        assert_eq!(got.per_subscription[0].1, [1]);
    }

    #[test]
    fn a_tenant_filling_the_series_memory_clears_its_own_not_another_s() {
        let mut ix = Index::new();
        for tenant in ["acme", "globex"] {
            ix.insert(sub_with(
                tenant,
                &["*"],
                &["t"],
                &[EventKind::Reading],
                Some(ValuePredicate::ChangedBy(0.5)),
            ));
        }
        let mut m = Matcher::new(4);
        // globex remembers one series.
        m.match_batch(&ix, &view("globex", &["g"], &["t"], &[(0, 0, 1.0)]));
        // acme floods the memory with many series.
        let devices: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
        let names: Vec<&str> = devices.iter().map(String::as_str).collect();
        let readings: Vec<(u32, u32, f64)> = (0..10).map(|i| (i, 0, 1.0)).collect();
        m.match_batch(&ix, &view("acme", &names, &["t"], &readings));
        assert!(m.series_cleared() > 0);
        // globex's series kept its previous value: a change of 1.0 matches.
        let got = m.match_batch(&ix, &view("globex", &["g"], &["t"], &[(0, 0, 2.0)]));
        assert_eq!(got.per_subscription.len(), 1, "globex's memory survived");
        assert_eq!(got.per_subscription[0].1, [0]);
    }

    #[test]
    fn malformed_indexes_are_skipped_and_unknown_tenants_match_nothing() {
        let mut ix = Index::new();
        let s = sub("acme", &["*"], &["*"]);
        ix.insert(s);
        let mut m = Matcher::new(10);
        let b = view(
            "acme",
            &["a"],
            &["t"],
            &[(0, 0, 1.0), (5, 0, 1.0), (0, 7, 1.0)],
        );
        assert_eq!(m.match_batch(&ix, &b).per_subscription[0].1, [0]);
        let b = view("globex", &["a"], &["t"], &[(0, 0, 1.0)]);
        assert!(m.match_batch(&ix, &b).per_subscription.is_empty());
    }

    #[test]
    fn large_dictionaries_use_the_sparse_pair_map() {
        let mut ix = Index::new();
        let s = sub("acme", &["d-1*"], &["m-2"]);
        let id = s.id;
        ix.insert(s);
        let devices: Vec<String> = (0..200).map(|i| format!("d-{i}")).collect();
        let metrics: Vec<String> = (0..200).map(|i| format!("m-{i}")).collect();
        let dv: Vec<&str> = devices.iter().map(String::as_str).collect();
        let mv: Vec<&str> = metrics.iter().map(String::as_str).collect();
        let readings: Vec<(u32, u32, f64)> = (0..400).map(|i| (i % 200, i % 3, 0.0)).collect();
        let got = Matcher::new(10).match_batch(&ix, &view("acme", &dv, &mv, &readings));
        let want: Vec<u32> = (0..400u32)
            .filter(|i| devices[(*i % 200) as usize].starts_with("d-1") && i % 3 == 2)
            .collect();
        assert_eq!(matched(&got, id), want);
    }
}
