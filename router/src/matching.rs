//! The indexed matching engine: which subscriptions an event matches. This module owns the
//! glob [`Pattern`]s of criteria, the [`Index`] of every tenant's subscriptions, and the
//! [`Matcher`] that runs batches through the index and remembers the previous value of
//! each series for `changed_by`.
//!
//! Why the index is shaped as it is:
//! - Tenant first: a map from tenant to that tenant's own index, so an event never sees,
//!   nor pays for, another tenant's subscriptions.
//! - Then one index per event kind: most subscriptions watch readings only, and a derived
//!   event must not wade through them (nor a reading through fault-only ones).
//! - Each subscription is placed on one dimension. Devices are the selective one, so a
//!   subscription goes there when every device pattern has a literal prefix; else on the
//!   metric dimension when every metric pattern has one (this covers the `*`-device
//!   subscriptions); else in a short residual list checked on every lookup (patterns such
//!   as `*-boiler` on both sides, which no prefix structure can narrow).
//! - On its dimension, a literal pattern is posted under its whole text in a hash map and
//!   any other pattern under its literal prefix in a prefix map. A lookup probes the exact
//!   map once and the prefix map once per distinct prefix length in use, so it reads only
//!   subscriptions whose literal prefix is a prefix of the name: the cost follows the
//!   number of plausible matches, not the number of subscriptions. The full criteria
//!   are then verified on those candidates only, cheaply: a posting whose key proves its
//!   dimension (a literal, or `prefix*`) skips that check, and a single literal on the
//!   other dimension is compared by fingerprint before any pattern is touched.
//! - Maps use the standard SipHash hasher on purpose: device and metric names are chosen
//!   by producers, and a faster unkeyed hash would let one flood a bucket. Lookups are per
//!   distinct (device, metric) pair of a batch, not per reading, so its cost is amortized.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use sluice_binding::BatchView;
use uuid::Uuid;

use crate::subscription::{EventKind, Subscription, ValuePredicate};

// ---------------------------------------------------------------------------------------
// Patterns
// ---------------------------------------------------------------------------------------

/// A compiled glob pattern: `*` matches any run of characters (including none), `?`
/// exactly one character, every other character itself.
///
/// Matching never backtracks: the pattern is cut at its `*`s into segments; the first
/// segment must match at the start, the last at the end (it has a fixed number of
/// characters, so its place is known), and each middle segment is searched once, left to
/// right, at its leftmost occurrence after the previous one (which is always a correct
/// choice for globs). The cost is at most O(len(s) × len(pattern)), linear for literal
/// segments, never exponential (`a*a*a*a*b` included).
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: Box<str>,
    /// Bytes of `source` before the first wildcard.
    prefix_len: usize,
    shape: Shape,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// Only `*`s: matches every string.
    Any,
    /// No wildcard: equality with the source.
    Literal,
    /// Some wildcard. `tail` is `None` when there is no `*`: then `head` must cover the
    /// whole string.
    Glob {
        head: Segment,
        middle: Vec<Segment>,
        tail: Option<Segment>,
    },
}

/// A run of the pattern between two `*`s: literals and `?`s, a fixed number of chars.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Segment {
    toks: Vec<Tok>,
    chars: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Lit(Box<str>),
    /// `n` consecutive `?`.
    AnyChars(usize),
}

impl Pattern {
    /// Compiles a pattern.
    pub fn new(p: &str) -> Self {
        let prefix_len = p.find(['*', '?']).unwrap_or(p.len());
        let shape = if !p.is_empty() && p.bytes().all(|b| b == b'*') {
            Shape::Any
        } else if prefix_len == p.len() {
            Shape::Literal
        } else {
            let mut parts = p.split('*');
            let head = Segment::parse(parts.next().unwrap_or(""));
            let rest: Vec<&str> = parts.collect();
            match rest.split_last() {
                None => Shape::Glob {
                    head,
                    middle: Vec::new(),
                    tail: None,
                },
                Some((last, middle)) => Shape::Glob {
                    head,
                    // `**` leaves an empty segment, which constrains nothing.
                    middle: middle
                        .iter()
                        .filter(|s| !s.is_empty())
                        .map(|s| Segment::parse(s))
                        .collect(),
                    tail: Some(Segment::parse(last)),
                },
            }
        };
        Self {
            source: p.into(),
            prefix_len,
            shape,
        }
    }

    /// Whether `s` matches the whole pattern.
    pub fn matches(&self, s: &str) -> bool {
        match &self.shape {
            Shape::Any => true,
            Shape::Literal => s == &*self.source,
            Shape::Glob { head, middle, tail } => {
                let Some(mut pos) = head.match_at(s, 0) else {
                    return false;
                };
                let Some(tail) = tail else {
                    return pos == s.len();
                };
                let tail_start = match tail.chars {
                    0 => s.len(),
                    k => match s.char_indices().nth_back(k - 1) {
                        Some((i, _)) => i,
                        None => return false,
                    },
                };
                if tail_start < pos || tail.match_at(s, tail_start).is_none() {
                    return false;
                }
                // Middle segments must fit between the head and the tail.
                let hay = &s[..tail_start];
                for seg in middle {
                    match seg.find(hay, pos) {
                        Some(end) => pos = end,
                        None => return false,
                    }
                }
                true
            }
        }
    }

    /// The characters before the first wildcard (the whole pattern if it has none).
    pub fn literal_prefix(&self) -> &str {
        &self.source[..self.prefix_len]
    }

    /// Whether the pattern has no wildcard (it matches only its own text).
    pub fn is_literal(&self) -> bool {
        matches!(self.shape, Shape::Literal)
    }

    /// Whether the pattern is its literal prefix, alone or followed by `*`s only: then a
    /// name with that prefix matches it.
    fn is_prefix_only(&self) -> bool {
        self.source[self.prefix_len..].bytes().all(|b| b == b'*')
    }

    /// Whether the pattern matches every string (it is made of `*` only).
    pub fn matches_all(&self) -> bool {
        matches!(self.shape, Shape::Any)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.source).finish()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Segment {
    fn parse(s: &str) -> Self {
        let mut toks = Vec::new();
        let mut lit = String::new();
        for c in s.chars() {
            if c == '?' {
                if !lit.is_empty() {
                    toks.push(Tok::Lit(std::mem::take(&mut lit).into()));
                }
                match toks.last_mut() {
                    Some(Tok::AnyChars(n)) => *n += 1,
                    _ => toks.push(Tok::AnyChars(1)),
                }
            } else {
                lit.push(c);
            }
        }
        if !lit.is_empty() {
            toks.push(Tok::Lit(lit.into()));
        }
        Self {
            toks,
            chars: s.chars().count(),
        }
    }

    /// The end of the match if the segment matches `s` at byte `at` (a char boundary).
    fn match_at(&self, s: &str, mut at: usize) -> Option<usize> {
        for t in &self.toks {
            match t {
                Tok::Lit(l) => {
                    if !s[at..].starts_with(&**l) {
                        return None;
                    }
                    at += l.len();
                }
                Tok::AnyChars(n) => {
                    let mut chars = s[at..].chars();
                    for _ in 0..*n {
                        at += chars.next()?.len_utf8();
                    }
                }
            }
        }
        Some(at)
    }

    /// The end of the leftmost match starting at or after byte `from`. The segment is not
    /// empty (empty middle segments are dropped at compile time).
    fn find(&self, s: &str, from: usize) -> Option<usize> {
        match self.toks.first() {
            // Jump between occurrences of the leading literal (`str::find` is linear).
            Some(Tok::Lit(l)) => {
                let mut start = from;
                loop {
                    let i = start + s[start..].find(&**l)?;
                    if let Some(end) = self.match_at(s, i) {
                        return Some(end);
                    }
                    start = i + s[i..].chars().next().map_or(1, char::len_utf8);
                }
            }
            _ => s[from..]
                .char_indices()
                .find_map(|(i, _)| self.match_at(s, from + i)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The index
// ---------------------------------------------------------------------------------------

/// Reference to a subscription held in the index.
pub type SubRef = Arc<Subscription>;

/// Position of a kind in the per-kind arrays.
fn kind_ix(k: EventKind) -> usize {
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
struct Entry {
    sub: SubRef,
    devices: Vec<Pattern>,
    metrics: Vec<Pattern>,
    devices_any: bool,
    metrics_any: bool,
    /// Fingerprints of the device and the metric when the list is one literal: most
    /// candidates that fail fail on that, settled here without touching the patterns.
    device_fp: Option<u64>,
    metric_fp: Option<u64>,
    value: Option<ValuePredicate>,
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

    fn watches_changes(&self) -> bool {
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
struct TenantIndex {
    slots: Vec<Option<Entry>>,
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

    fn entry(&self, slot: u32) -> &Entry {
        self.slots[slot as usize]
            .as_ref()
            .expect("postings only hold live slots")
    }

    /// Appends to `slots` the distinct slots whose kind, device and metric patterns match;
    /// returns how many postings were read (before deduplication and verification).
    fn lookup(&self, kind: EventKind, device: &str, metric: &str, slots: &mut Vec<u32>) -> usize {
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
    tenants: HashMap<String, TenantIndex>,
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
        if !tenant.insert(sub) {
            self.len += 1;
        }
    }

    /// Removes a subscription; returns it if it was there.
    pub fn remove(&mut self, tenant: &str, id: Uuid) -> Option<SubRef> {
        let t = self.tenants.get_mut(tenant)?;
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
            self.tenants.insert(tenant.to_owned(), t);
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

// ---------------------------------------------------------------------------------------
// The matcher
// ---------------------------------------------------------------------------------------

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
/// previous values are remembered: when a new series would exceed that, the whole memory
/// is cleared and the clearing counted ([`Matcher::series_cleared`]), so the next value
/// of each series does not match `changed_by` (as for a series seen for the first time).
/// Clearing everything keeps the memory bounded without per-entry bookkeeping on the hot
/// path; a bound sized above the live series count makes it a rare event.
#[derive(Debug)]
pub struct Matcher {
    max_series: usize,
    previous: HashMap<Box<[u8]>, f64>,
    cleared: u64,
    scratch: Scratch,
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
            max_series: max_series.max(1),
            previous: HashMap::new(),
            cleared: 0,
            scratch: Scratch::default(),
        }
    }

    /// How many times the series memory was cleared for exceeding its bound.
    pub fn series_cleared(&self) -> u64 {
        self.cleared
    }

    /// How many series have a remembered previous value.
    pub fn series_len(&self) -> usize {
        self.previous.len()
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
            max_series,
            previous,
            cleared,
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
                series_key(&mut s.key, batch.tenant, EventKind::Reading, device, metric);
                pair.prev = previous.get(&s.key[..]).copied();
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
                series_key(&mut s.key, batch.tenant, EventKind::Reading, device, metric);
                remember(previous, *max_series, cleared, &s.key, x);
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
            series_key(&mut s.key, tenant, kind, device, metric);
            self.previous.get(&s.key[..]).copied()
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
            remember(
                &mut self.previous,
                self.max_series,
                &mut self.cleared,
                &s.key,
                value,
            );
        }
        matched
    }
}

/// The memory key of a series. 0xFF never occurs in UTF-8, so the separators make the
/// key unambiguous whatever the names contain.
fn series_key(key: &mut Vec<u8>, tenant: &str, kind: EventKind, device: &str, metric: &str) {
    key.clear();
    key.extend_from_slice(tenant.as_bytes());
    key.push(0xFF);
    key.push(kind_ix(kind) as u8);
    key.extend_from_slice(device.as_bytes());
    key.push(0xFF);
    key.extend_from_slice(metric.as_bytes());
}

fn remember(
    previous: &mut HashMap<Box<[u8]>, f64>,
    max_series: usize,
    cleared: &mut u64,
    key: &[u8],
    x: f64,
) {
    if let Some(v) = previous.get_mut(key) {
        *v = x;
        return;
    }
    if previous.len() >= max_series {
        previous.clear();
        *cleared += 1;
        tracing::debug!(max_series, "series memory full, cleared");
    }
    previous.insert(key.into(), x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscription::{Criteria, Policy, Target};
    use sluice_binding::TenantId;

    fn sub_with(
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

    fn sub(tenant: &str, devices: &[&str], metrics: &[&str]) -> Subscription {
        sub_with(tenant, devices, metrics, &[EventKind::Reading], None)
    }

    fn ids(subs: &[SubRef]) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = subs.iter().map(|s| s.id).collect();
        ids.sort();
        ids
    }

    fn cands(index: &Index, tenant: &str, kind: EventKind, d: &str, m: &str) -> Vec<Uuid> {
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

    fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
        v.sort();
        v
    }

    /// A batch view over borrowed names: readings are (device, metric, value).
    fn view<'a>(
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

    fn matched(m: &BatchMatches, id: Uuid) -> Vec<u32> {
        m.per_subscription
            .iter()
            .find(|(s, _)| s.id == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    #[test]
    fn glob_semantics() {
        for (p, s, want) in [
            ("boiler-1", "boiler-1", true),
            ("boiler-1", "boiler-12", false),
            ("boiler-1", "boiler-", false),
            ("*", "", true),
            ("*", "anything", true),
            ("**", "x", true),
            ("", "", true),
            ("", "x", false),
            ("?", "", false),
            ("?", "a", true),
            ("?", "ab", false),
            ("?", "é", true),
            ("d??", "déf", true),
            ("d??", "dé", false),
            ("boiler-*", "boiler-", true),
            ("boiler-*", "boiler-7", true),
            ("boiler-*", "boile", false),
            ("*-temp", "a-temp", true),
            ("*-temp", "-temp", true),
            ("*-temp", "a-tem", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b*c", "acb", false),
            ("a*b*b", "abb", true),
            ("a*b*b", "ab", false),
            ("*a*", "bab", true),
            ("*a*", "bbb", false),
            ("a*?", "a", false),
            ("a*?", "ab", true),
            ("*?*?*", "x", false),
            ("*?*?*", "xy", true),
            ("s-?-*-t?", "s-1-abc-t9", true),
            ("s-?-*-t?", "s-12-abc-t9", false),
            ("a*ab", "aab", true),
            ("*ab*ab", "abab", true),
            ("*ab*ab", "aba", false),
            ("x*y?z*", "xxyyzz", true),
            ("ab*ba", "aba", false),
            ("*.*", "a.b", true),
        ] {
            assert_eq!(Pattern::new(p).matches(s), want, "{p:?} vs {s:?}");
        }
    }

    /// Textbook dynamic-programming glob matcher, the reference for the fast one.
    fn reference(p: &[char], s: &[char]) -> bool {
        let mut m = vec![vec![false; s.len() + 1]; p.len() + 1];
        m[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=s.len() {
                m[i][j] = match p[i - 1] {
                    '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                    '?' => j > 0 && m[i - 1][j - 1],
                    c => j > 0 && s[j - 1] == c && m[i - 1][j - 1],
                };
            }
        }
        m[p.len()][s.len()]
    }

    /// Every word of up to `n` characters over `alphabet`.
    fn words(alphabet: &[char], n: usize) -> Vec<Vec<char>> {
        let mut all = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..n {
            last = last
                .iter()
                .flat_map(|w| {
                    alphabet.iter().map(move |c| {
                        let mut w = w.clone();
                        w.push(*c);
                        w
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn glob_agrees_with_the_reference_exhaustively() {
        let subjects = words(&['a', 'b', 'é'], 5);
        for p in words(&['a', 'é', '*', '?'], 5) {
            let pattern = Pattern::new(&p.iter().collect::<String>());
            for s in &subjects {
                assert_eq!(
                    pattern.matches(&s.iter().collect::<String>()),
                    reference(&p, s),
                    "{pattern:?} vs {s:?}"
                );
            }
        }
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let s = "a".repeat(20_000);
        let p = Pattern::new(&format!("{}b", "a*".repeat(60)));
        assert!(!p.matches(&s));
        let p = Pattern::new(&format!("*{}*", "?a*".repeat(60)));
        assert!(p.matches(&s));
        let p = Pattern::new(&format!("{}?b", "*a?".repeat(40)));
        assert!(!p.matches(&s));
    }

    #[test]
    fn pattern_properties() {
        let p = Pattern::new("site-12-*");
        assert_eq!((p.literal_prefix(), p.is_literal()), ("site-12-", false));
        let p = Pattern::new("dev-?1");
        assert_eq!((p.literal_prefix(), p.is_literal()), ("dev-", false));
        let p = Pattern::new("dev-1");
        assert_eq!((p.literal_prefix(), p.is_literal()), ("dev-1", true));
        let p = Pattern::new("*");
        assert!(p.matches_all() && p.literal_prefix().is_empty());
        assert_eq!(p.to_string(), "*");
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
