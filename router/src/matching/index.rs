//! The index of every tenant's subscriptions: tenant first, then one index per event
//! kind, each subscription posted on one dimension (see the [module doc](super)).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use uuid::Uuid;

use super::pattern::Pattern;
use sluice_binding::event::EventKind;

use crate::subscription::{Subscription, ValuePredicate};

/// Reference to a subscription held in the index.
pub type SubRef = Arc<Subscription>;

/// Position of a kind in the per-kind arrays.
pub(super) fn kind_ix(k: EventKind) -> usize {
    match k {
        EventKind::Reading => 0,
        EventKind::Fault => 1,
        EventKind::Threshold => 2,
    }
}

/// The dimension a subscription is posted on (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dim {
    Device,
    Metric,
    Rest,
    /// An empty pattern list matches nothing (validation refuses it).
    Nowhere,
}

/// A posting: a slot number with two flags in its high bits.
type Posting = u32;
/// The posting's key proves the match on its dimension (the pattern is literal, or its
/// literal prefix followed by `*` only), so verification skips that dimension.
const PROVED: Posting = 1 << 31;
/// The subscription has several postings on its dimension, so a lookup may gather it
/// more than once: only then is deduplication needed.
const REPEATS: Posting = 1 << 30;
/// The slot number of a posting.
const SLOT: Posting = REPEATS - 1;

/// A subscription with its compiled criteria, laid out for verification: the flags and
/// the predicate sit in the entry itself, so a candidate that fails or passes trivially
/// costs no further pointer chase.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) sub: SubRef,
    devices: Vec<Pattern>,
    metrics: Vec<Pattern>,
    devices_any: bool,
    metrics_any: bool,
    /// Fingerprints of the device and the metric when the list is one literal: most
    /// candidates that fail fail on that, settled here without touching the patterns.
    device_fp: Option<u64>,
    metric_fp: Option<u64>,
    pub(super) value: Option<ValuePredicate>,
    kinds: [bool; 3],
    dim: Dim,
}

impl Entry {
    fn new(sub: Subscription) -> Self {
        let c = &sub.criteria;
        let devices: Vec<Pattern> = c.devices.iter().map(|p| Pattern::new(p)).collect();
        let metrics: Vec<Pattern> = c.metrics.iter().map(|p| Pattern::new(p)).collect();
        let prefixed = |ps: &[Pattern]| ps.iter().all(|p| !p.literal_prefix().is_empty());
        let dim = if devices.is_empty() || metrics.is_empty() {
            Dim::Nowhere
        } else if prefixed(&devices) {
            Dim::Device
        } else if prefixed(&metrics) {
            Dim::Metric
        } else {
            Dim::Rest
        };
        let mut kinds = [false; 3];
        for k in &c.kinds {
            kinds[kind_ix(*k)] = true;
        }
        Self {
            devices_any: devices.iter().any(Pattern::matches_all),
            metrics_any: metrics.iter().any(Pattern::matches_all),
            device_fp: single_literal(&devices),
            metric_fp: single_literal(&metrics),
            value: c.value,
            sub: Arc::new(sub),
            devices,
            metrics,
            kinds,
            dim,
        }
    }

    pub(super) fn watches_changes(&self) -> bool {
        matches!(self.value, Some(ValuePredicate::ChangedBy(_)))
    }

    fn admits_device(&self, e: &Event<'_>) -> bool {
        self.devices_any
            || (self.device_fp.is_none_or(|fp| fp == e.device_fp)
                && self.devices.iter().any(|p| p.matches(e.device)))
    }

    fn admits_metric(&self, e: &Event<'_>) -> bool {
        self.metrics_any
            || (self.metric_fp.is_none_or(|fp| fp == e.metric_fp)
                && self.metrics.iter().any(|p| p.matches(e.metric)))
    }

    /// The pattern check (the kind is implied by the per-kind index); `proved` when a
    /// posting already proved the entry's own dimension.
    fn admits(&self, proved: bool, e: &Event<'_>) -> bool {
        match (self.dim, proved) {
            (Dim::Device, true) => self.admits_metric(e),
            (Dim::Metric, true) => self.admits_device(e),
            _ => self.admits_device(e) && self.admits_metric(e),
        }
    }

    /// The patterns posted on the entry's dimension.
    fn dim_patterns(&self) -> &[Pattern] {
        match self.dim {
            Dim::Device => &self.devices,
            Dim::Metric => &self.metrics,
            Dim::Rest | Dim::Nowhere => &[],
        }
    }
}

/// The fingerprint of the only pattern of a list, if it is a literal.
fn single_literal(ps: &[Pattern]) -> Option<u64> {
    match ps {
        [p] if p.is_literal() => Some(fingerprint(p.as_str())),
        _ => None,
    }
}

/// A fixed-key hash: a pre-filter only (equal fingerprints are verified), so a collision
/// costs one pattern check, nothing more.
fn fingerprint(s: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(s)
}

/// The names of the event being looked up, with their fingerprints.
#[derive(Debug)]
struct Event<'a> {
    device: &'a str,
    metric: &'a str,
    device_fp: u64,
    metric_fp: u64,
}

/// Postings of one dimension.
#[derive(Clone, Debug, Default)]
struct DimIndex {
    exact: HashMap<Box<str>, Vec<Posting>>,
    prefixed: HashMap<Box<str>, Vec<Posting>>,
    /// Distinct key lengths of `prefixed`, with how many keys have each: a lookup probes
    /// only these prefixes of the name.
    prefix_lens: BTreeMap<usize, usize>,
}

impl DimIndex {
    fn add(&mut self, p: &Pattern, posting: Posting) {
        let proved = if p.is_prefix_only() { PROVED } else { 0 };
        if p.is_literal() {
            self.exact
                .entry(p.as_str().into())
                .or_default()
                .push(posting | proved);
            return;
        }
        let key = p.literal_prefix();
        match self.prefixed.get_mut(key) {
            Some(list) => list.push(posting | proved),
            None => {
                self.prefixed.insert(key.into(), vec![posting | proved]);
                *self.prefix_lens.entry(key.len()).or_default() += 1;
            }
        }
    }

    fn remove(&mut self, p: &Pattern, slot: u32) {
        let (map, key) = if p.is_literal() {
            (&mut self.exact, p.as_str())
        } else {
            (&mut self.prefixed, p.literal_prefix())
        };
        // A pattern listed twice was posted twice: the first call removes both.
        let Some(list) = map.get_mut(key) else { return };
        list.retain(|s| *s & SLOT != slot);
        if !list.is_empty() {
            return;
        }
        map.remove(key);
        if !p.is_literal()
            && let Some(n) = self.prefix_lens.get_mut(&key.len())
        {
            *n -= 1;
            if *n == 0 {
                self.prefix_lens.remove(&key.len());
            }
        }
    }

    fn gather(&self, name: &str, out: &mut Vec<Posting>) {
        if let Some(list) = self.exact.get(name) {
            out.extend_from_slice(list);
        }
        for &len in self.prefix_lens.range(..=name.len()).map(|(l, _)| l) {
            // `get` is None when `len` is not a char boundary of `name`: no such prefix.
            if let Some(list) = name.get(..len).and_then(|k| self.prefixed.get(k)) {
                out.extend_from_slice(list);
            }
        }
    }
}

/// The index of one event kind of one tenant.
#[derive(Clone, Debug, Default)]
struct KindIndex {
    devices: DimIndex,
    metrics: DimIndex,
    rest: Vec<Posting>,
}

impl KindIndex {
    fn add(&mut self, e: &Entry, slot: u32) {
        let repeats = if e.dim_patterns().len() > 1 {
            REPEATS
        } else {
            0
        };
        match e.dim {
            Dim::Device => e
                .devices
                .iter()
                .for_each(|p| self.devices.add(p, slot | repeats)),
            Dim::Metric => e
                .metrics
                .iter()
                .for_each(|p| self.metrics.add(p, slot | repeats)),
            Dim::Rest => self.rest.push(slot),
            Dim::Nowhere => {}
        }
    }

    fn remove(&mut self, e: &Entry, slot: u32) {
        match e.dim {
            Dim::Device => e.devices.iter().for_each(|p| self.devices.remove(p, slot)),
            Dim::Metric => e.metrics.iter().for_each(|p| self.metrics.remove(p, slot)),
            Dim::Rest => self.rest.retain(|s| *s != slot),
            Dim::Nowhere => {}
        }
    }

    fn gather(&self, device: &str, metric: &str, out: &mut Vec<Posting>) {
        self.devices.gather(device, out);
        self.metrics.gather(metric, out);
        out.extend_from_slice(&self.rest);
    }
}

/// One tenant's subscriptions. Postings hold slot numbers (4 bytes, no reference count
/// traffic); freed slots are reused.
#[derive(Clone, Debug, Default)]
pub(super) struct TenantIndex {
    pub(super) slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    ids: HashMap<Uuid, u32>,
    kinds: [KindIndex; 3],
}

impl TenantIndex {
    /// Returns whether a subscription with the same id was replaced.
    fn insert(&mut self, sub: Subscription) -> bool {
        let replaced = self.remove(sub.id).is_some();
        let entry = Entry::new(sub);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        assert!(slot <= SLOT, "more than 2^30 subscriptions in one tenant");
        for (k, on) in entry.kinds.iter().enumerate() {
            if *on {
                self.kinds[k].add(&entry, slot);
            }
        }
        self.ids.insert(entry.sub.id, slot);
        self.slots[slot as usize] = Some(entry);
        replaced
    }

    fn remove(&mut self, id: Uuid) -> Option<SubRef> {
        let slot = self.ids.remove(&id)?;
        let entry = self.slots[slot as usize].take()?;
        for (k, on) in entry.kinds.iter().enumerate() {
            if *on {
                self.kinds[k].remove(&entry, slot);
            }
        }
        self.free.push(slot);
        Some(entry.sub)
    }

    pub(super) fn entry(&self, slot: u32) -> &Entry {
        self.slots[slot as usize]
            .as_ref()
            .expect("postings only hold live slots")
    }

    /// Appends to `slots` the distinct slots whose kind, device and metric patterns match;
    /// returns how many postings were read (before deduplication and verification).
    pub(super) fn lookup(
        &self,
        kind: EventKind,
        device: &str,
        metric: &str,
        slots: &mut Vec<u32>,
    ) -> usize {
        let start = slots.len();
        self.kinds[kind_ix(kind)].gather(device, metric, slots);
        let examined = slots.len() - start;
        if examined == 0 {
            return 0;
        }
        let event = Event {
            device,
            metric,
            device_fp: fingerprint(device),
            metric_fp: fingerprint(metric),
        };
        let gathered = &mut slots[start..];
        if gathered.iter().any(|p| p & REPEATS != 0) {
            // Group the postings of each slot; one of them may prove the dimension.
            gathered.sort_unstable_by_key(|p| p & SLOT);
        }
        let mut kept = start;
        for r in start..slots.len() {
            let p = slots[r];
            let slot = p & SLOT;
            let mut proved = p & PROVED != 0;
            if p & REPEATS != 0 {
                // Only the first posting of a run decides. (Writes below go to `kept`,
                // at most `r`, and rewrite a posting to its own slot, so `r - 1` still
                // names the right slot and `r + 1..` is untouched.)
                if r > start && slots[r - 1] & SLOT == slot {
                    continue;
                }
                proved |= slots[r + 1..]
                    .iter()
                    .take_while(|q| *q & SLOT == slot)
                    .any(|q| q & PROVED != 0);
            }
            if self.entry(slot).admits(proved, &event) {
                slots[kept] = slot;
                kept += 1;
            }
        }
        slots.truncate(kept);
        examined
    }
}

/// All subscriptions of all tenants, indexed so that the cost of matching one event does
/// not grow linearly with the number of subscriptions (see the module doc for the shape).
#[derive(Debug, Default, Clone)]
pub struct Index {
    /// Shared between snapshots of a `SharedIndex`: a change copies only its tenant's.
    pub(super) tenants: HashMap<String, Arc<TenantIndex>>,
    len: usize,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces (same tenant + id) a subscription.
    pub fn insert(&mut self, sub: Subscription) {
        let tenant = match self.tenants.get_mut(sub.tenant.as_str()) {
            Some(t) => t,
            None => self.tenants.entry(sub.tenant.to_string()).or_default(),
        };
        if !Arc::make_mut(tenant).insert(sub) {
            self.len += 1;
        }
    }

    /// Removes a subscription; returns it if it was there.
    pub fn remove(&mut self, tenant: &str, id: Uuid) -> Option<SubRef> {
        let t = self.tenants.get_mut(tenant)?;
        if !t.ids.contains_key(&id) {
            return None;
        }
        let t = Arc::make_mut(t);
        let removed = t.remove(id)?;
        self.len -= 1;
        if t.ids.is_empty() {
            self.tenants.remove(tenant);
        }
        Some(removed)
    }

    /// Replaces every subscription of `tenant` at once (used when a tenant's set is
    /// reloaded from Redis). Subscriptions owned by another tenant are skipped (and
    /// logged): a tenant's set must never carry someone else's subscription.
    pub fn replace_tenant(&mut self, tenant: &str, subs: Vec<Subscription>) {
        if let Some(old) = self.tenants.remove(tenant) {
            self.len -= old.ids.len();
        }
        let mut t = TenantIndex::default();
        for sub in subs {
            if sub.tenant.as_str() != tenant {
                tracing::warn!(
                    tenant,
                    owner = %sub.tenant,
                    id = %sub.id,
                    "subscription of another tenant in a tenant's set, skipped"
                );
                continue;
            }
            t.insert(sub);
        }
        if !t.ids.is_empty() {
            self.len += t.ids.len();
            self.tenants.insert(tenant.to_owned(), Arc::new(t));
        }
    }

    /// A subscription by tenant and id.
    pub fn get(&self, tenant: &str, id: Uuid) -> Option<&SubRef> {
        let t = self.tenants.get(tenant)?;
        Some(&t.entry(*t.ids.get(&id)?).sub)
    }

    /// Number of subscriptions, all tenants.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every subscription of `tenant`, by id (UUID v7: creation order).
    pub fn tenant_subscriptions(&self, tenant: &str) -> Vec<SubRef> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let mut subs: Vec<SubRef> = t.slots.iter().flatten().map(|e| e.sub.clone()).collect();
        subs.sort_by_key(|s| s.id);
        subs
    }

    /// Subscriptions of `tenant` whose kind, device and metric patterns match (value
    /// predicate NOT evaluated), appended to `out` without duplicates (`out` is not
    /// cleared; what was already in it is not looked at).
    pub fn candidates(
        &self,
        tenant: &str,
        kind: EventKind,
        device: &str,
        metric: &str,
        out: &mut Vec<SubRef>,
    ) {
        self.candidates_examined(tenant, kind, device, metric, out);
    }

    /// [`Index::candidates`], returning how many index postings the lookup read before
    /// deduplication and verification: the work done, which follows the number of
    /// plausible matches rather than the number of subscriptions (for tests and
    /// diagnostics).
    pub fn candidates_examined(
        &self,
        tenant: &str,
        kind: EventKind,
        device: &str,
        metric: &str,
        out: &mut Vec<SubRef>,
    ) -> usize {
        let Some(t) = self.tenants.get(tenant) else {
            return 0;
        };
        let mut slots = Vec::new();
        let examined = t.lookup(kind, device, metric, &mut slots);
        out.extend(slots.iter().map(|s| t.entry(*s).sub.clone()));
        examined
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matching::Matcher;
    use crate::matching::test_support::*;

    /// The API bounds the subscriptions the index scans on every lookup by
    /// `Criteria::is_scanned`: it must name exactly those placed on the residual list.
    #[test]
    fn scanned_criteria_are_exactly_the_residual_ones() {
        let cases: [(&[&str], &[&str]); 7] = [
            (&["boiler-1"], &["temp"]),
            (&["*"], &["temp"]),
            (&["*"], &["*"]),
            (&["?x"], &["*-hum", "t*"]),
            (&["a*", "*b"], &["*c"]),
            (&["a*", "b*"], &["*"]),
            (&["*-boiler"], &["temp", "?"]),
        ];
        for (devices, metrics) in cases {
            let s = sub("acme", devices, metrics);
            let scanned = s.criteria.is_scanned();
            assert_eq!(
                Entry::new(s).dim == Dim::Rest,
                scanned,
                "{devices:?} {metrics:?}"
            );
        }
    }

    #[test]
    fn exact_prefix_any_and_metric_only() {
        let mut ix = Index::new();
        let exact = sub("acme", &["boiler-1"], &["temp"]);
        let prefix = sub("acme", &["boiler-*"], &["*"]);
        let qmark = sub("acme", &["boiler-?"], &["temp"]);
        let metric_only = sub("acme", &["*"], &["temp"]);
        let metric_prefix = sub("acme", &["*"], &["hum*"]);
        let everything = sub("acme", &["*"], &["*"]);
        let suffix = sub("acme", &["*-1"], &["*"]);
        let all = [
            &exact,
            &prefix,
            &qmark,
            &metric_only,
            &metric_prefix,
            &everything,
            &suffix,
        ]
        .map(|s| s.id);
        for s in [
            &exact,
            &prefix,
            &qmark,
            &metric_only,
            &metric_prefix,
            &everything,
            &suffix,
        ] {
            ix.insert(s.clone());
        }
        assert_eq!(ix.len(), 7);
        let [
            exact,
            prefix,
            qmark,
            metric_only,
            metric_prefix,
            everything,
            suffix,
        ] = all;
        let r = EventKind::Reading;
        assert_eq!(
            cands(&ix, "acme", r, "boiler-1", "temp"),
            sorted(vec![exact, prefix, qmark, metric_only, everything, suffix])
        );
        assert_eq!(
            cands(&ix, "acme", r, "boiler-12", "temp"),
            sorted(vec![prefix, metric_only, everything])
        );
        assert_eq!(
            cands(&ix, "acme", r, "pump-1", "humidity"),
            sorted(vec![metric_prefix, everything, suffix])
        );
        assert_eq!(cands(&ix, "acme", r, "pump-2", "co2"), vec![everything]);
        // Readings-only subscriptions do not see derived events.
        assert!(cands(&ix, "acme", EventKind::Fault, "boiler-1", "temp").is_empty());
    }

    #[test]
    fn several_patterns_yield_one_candidate() {
        let mut ix = Index::new();
        let s = sub(
            "acme",
            &["boiler-1", "boiler-*", "b*", "boiler-?", "boiler-1"],
            &["temp", "t*"],
        );
        let id = s.id;
        ix.insert(s);
        let mut out = Vec::new();
        let examined =
            ix.candidates_examined("acme", EventKind::Reading, "boiler-1", "temp", &mut out);
        assert_eq!(ids(&out), vec![id]);
        assert_eq!(examined, 5, "posted once per device pattern");
        // Removal takes every posting away.
        ix.remove("acme", id).unwrap();
        assert!(cands(&ix, "acme", EventKind::Reading, "boiler-1", "temp").is_empty());
        assert!(ix.is_empty());

        // One posting proves the device (the literal), the other does not (`boiler-*x`
        // needs its tail checked): the run of a slot is decided once, either way.
        let s = sub("acme", &["boiler-*x", "boiler-1"], &["temp"]);
        let id = s.id;
        ix.insert(s);
        let r = EventKind::Reading;
        for (device, metric, want) in [
            ("boiler-1", "temp", vec![id]),
            ("boiler-7x", "temp", vec![id]),
            ("boiler-2", "temp", vec![]),
            ("boiler-1", "hum", vec![]),
        ] {
            assert_eq!(cands(&ix, "acme", r, device, metric), want, "{device}");
        }
    }

    #[test]
    fn kinds_are_indexed_separately() {
        let mut ix = Index::new();
        let both = sub_with(
            "acme",
            &["boiler-1"],
            &["*"],
            &[EventKind::Reading, EventKind::Fault, EventKind::Reading],
            None,
        );
        let threshold = sub_with("acme", &["*"], &["*"], &[EventKind::Threshold], None);
        let none = sub_with("acme", &["boiler-1"], &["*"], &[], None);
        let (both_id, threshold_id) = (both.id, threshold.id);
        for s in [both, threshold, none] {
            ix.insert(s);
        }
        assert_eq!(ix.len(), 3);
        let c = |ix: &Index, k| cands(ix, "acme", k, "boiler-1", "t");
        assert_eq!(c(&ix, EventKind::Reading), [both_id]);
        assert_eq!(c(&ix, EventKind::Fault), [both_id]);
        assert_eq!(c(&ix, EventKind::Threshold), [threshold_id]);
        // A kind listed twice is posted once per kind; removal leaves nothing behind.
        ix.remove("acme", both_id).unwrap();
        assert!(c(&ix, EventKind::Reading).is_empty());
    }

    #[test]
    fn tenants_are_isolated() {
        let mut ix = Index::new();
        let a = sub("acme", &["*"], &["*"]);
        let b = sub("globex", &["boiler-1"], &["temp"]);
        let (a_id, b_id) = (a.id, b.id);
        ix.insert(a);
        ix.insert(b);
        let r = EventKind::Reading;
        assert_eq!(cands(&ix, "acme", r, "boiler-1", "temp"), vec![a_id]);
        assert_eq!(cands(&ix, "globex", r, "boiler-1", "temp"), vec![b_id]);
        assert!(cands(&ix, "initech", r, "boiler-1", "temp").is_empty());
        assert!(ix.get("acme", b_id).is_none());
        assert!(ix.remove("acme", b_id).is_none());
        assert_eq!(ix.len(), 2);

        let mut m = Matcher::new(100);
        let batch = view("globex", &["boiler-1"], &["temp"], &[(0, 0, 1.0)]);
        let got = m.match_batch(&ix, &batch);
        assert_eq!(got.per_subscription.len(), 1);
        assert_eq!(got.per_subscription[0].0.id, b_id);
    }

    #[test]
    fn insert_replaces_remove_and_replace_tenant() {
        let mut ix = Index::new();
        let mut s = sub("acme", &["boiler-1"], &["temp"]);
        let id = s.id;
        ix.insert(s.clone());
        s.criteria.devices = vec!["pump-*".into()];
        ix.insert(s.clone());
        assert_eq!(ix.len(), 1);
        let r = EventKind::Reading;
        assert!(cands(&ix, "acme", r, "boiler-1", "temp").is_empty());
        assert_eq!(cands(&ix, "acme", r, "pump-3", "temp"), vec![id]);
        assert_eq!(ix.get("acme", id).unwrap().criteria.devices, ["pump-*"]);

        let other = sub("globex", &["*"], &["*"]);
        let other_id = other.id;
        ix.insert(other);
        let fresh = sub("acme", &["valve-*"], &["*"]);
        let fresh_id = fresh.id;
        let stray = sub("globex", &["valve-1"], &["*"]);
        ix.replace_tenant("acme", vec![fresh, stray]);
        assert_eq!(ix.len(), 2);
        assert!(ix.get("acme", id).is_none());
        assert!(cands(&ix, "acme", r, "pump-3", "temp").is_empty());
        assert_eq!(cands(&ix, "acme", r, "valve-9", "x"), vec![fresh_id]);
        assert_eq!(cands(&ix, "globex", r, "valve-1", "x"), vec![other_id]);
        let acme: Vec<Uuid> = ix
            .tenant_subscriptions("acme")
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(acme, vec![fresh_id]);

        ix.replace_tenant("acme", Vec::new());
        assert_eq!(ix.len(), 1);
        assert!(ix.tenant_subscriptions("acme").is_empty());
        assert_eq!(ix.remove("globex", other_id).unwrap().id, other_id);
        assert!(ix.is_empty());

        // Slots freed by removal are reused without leaking old postings.
        let a = sub("acme", &["a-*"], &["*"]);
        let a_id = a.id;
        ix.insert(a);
        ix.remove("acme", a_id);
        let b = sub("acme", &["b-1"], &["*"]);
        let b_id = b.id;
        ix.insert(b);
        assert!(cands(&ix, "acme", r, "a-1", "x").is_empty());
        assert_eq!(cands(&ix, "acme", r, "b-1", "x"), vec![b_id]);
    }

    #[test]
    fn lookups_do_not_scan_all_subscriptions() {
        let mut ix = Index::new();
        for i in 0..10_000 {
            ix.insert(sub("acme", &[&format!("dev-{i:05}")], &["temp"]));
            ix.insert(sub("acme", &[&format!("site-{i:05}-*")], &["temp"]));
            ix.insert(sub("acme", &["*"], &[&format!("metric-{i:05}")]));
        }
        assert_eq!(ix.len(), 30_000);
        let r = EventKind::Reading;
        let mut out = Vec::new();
        let examined = ix.candidates_examined("acme", r, "dev-04242", "temp", &mut out);
        assert_eq!((out.len(), examined), (1, 1));
        out.clear();
        let examined =
            ix.candidates_examined("acme", r, "site-00042-boiler", "metric-00042", &mut out);
        assert_eq!((out.len(), examined), (1, 2));
        out.clear();
        let examined = ix.candidates_examined("acme", r, "nothing", "nothing", &mut out);
        assert_eq!((out.len(), examined), (0, 0));
    }

    /// The index agrees with checking every subscription, on random criteria (several
    /// patterns, every shape, duplicates) and events, across removals.
    #[test]
    fn index_agrees_with_a_full_scan() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let names = ["s1-a", "s1-b", "s1-ab", "s2-a", "s2-é", "x", "s1-"];
        let shapes = [
            "s1-a", "s1-*", "s1-?", "s?-a", "*-a", "*", "s1-a*", "s*b", "x", "*b*",
        ];
        let pick = |rng: &mut StdRng| -> Vec<String> {
            (0..rng.random_range(1..=3))
                .map(|_| shapes[rng.random_range(0..shapes.len())].to_owned())
                .collect()
        };
        let mut ix = Index::new();
        let mut all: Vec<Subscription> = Vec::new();
        for _ in 0..300 {
            let mut s = sub("acme", &[], &[]);
            s.criteria.devices = pick(&mut rng);
            s.criteria.metrics = pick(&mut rng);
            s.criteria.kinds = EventKind::ALL
                .into_iter()
                .filter(|_| rng.random_bool(0.6))
                .collect();
            ix.insert(s.clone());
            all.push(s);
        }
        for round in 0..2 {
            if round == 1 {
                let gone: Vec<Uuid> = all.iter().step_by(3).map(|s| s.id).collect();
                for id in &gone {
                    assert!(ix.remove("acme", *id).is_some());
                }
                all.retain(|s| !gone.contains(&s.id));
                assert_eq!(ix.len(), all.len());
            }
            for kind in EventKind::ALL {
                for device in names {
                    for metric in names {
                        let want: Vec<Uuid> = sorted(
                            all.iter()
                                .filter(|s| {
                                    let c = &s.criteria;
                                    c.kinds.contains(&kind)
                                        && c.devices.iter().any(|p| Pattern::new(p).matches(device))
                                        && c.metrics.iter().any(|p| Pattern::new(p).matches(metric))
                                })
                                .map(|s| s.id)
                                .collect(),
                        );
                        assert_eq!(
                            cands(&ix, "acme", kind, device, metric),
                            want,
                            "{kind:?} {device} {metric}"
                        );
                    }
                }
            }
        }
    }
}
