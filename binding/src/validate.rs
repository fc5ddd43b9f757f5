//! The rules every consumer checks on a batch (`docs/binding.md` section 3), shared with the
//! HTTP front end so that a reading refused over HTTP is refused for the same reason, with
//! the same words, as one published straight to the broker.

use std::fmt;

use crate::model::{BatchView, TenantId};

/// 2000-01-01T00:00:00Z in ns: earlier device timestamps are refused as clock errors.
pub const MIN_TIMESTAMP_NS: i64 = 946_684_800_000_000_000;

/// Longest device or metric name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Nanoseconds in a UTC day: storage partitions by tenant and UTC day.
pub const NS_PER_DAY: i64 = 86_400_000_000_000;

/// The UTC day (days since the Unix epoch) of a timestamp in ns.
pub fn utc_day(ts_ns: i64) -> i64 {
    ts_ns.div_euclid(NS_PER_DAY)
}

/// The distinct UTC days of some readings, sorted: the storage partitions they touch (one
/// file each per commit). Small by construction: batches hold at most
/// [`Limits::max_days`] of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaySet(Vec<i64>);

impl DaySet {
    /// The days of `ts`, or `Err(n)` as soon as more than `max` distinct days are seen
    /// (`n = max + 1`).
    pub fn of(ts: &[i64], max: usize) -> Result<Self, usize> {
        let mut days = Self::default();
        let mut last = None;
        for &t in ts {
            let day = utc_day(t);
            // Readings come in runs of one day: skip the search for those.
            if last == Some(day) {
                continue;
            }
            last = Some(day);
            days.insert(day);
            if days.len() > max {
                return Err(days.len());
            }
        }
        Ok(days)
    }

    /// Adds a day; whether it was new.
    pub fn insert(&mut self, day: i64) -> bool {
        match self.0.binary_search(&day) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, day);
                true
            }
        }
    }

    /// Whether `day` is in the set.
    pub fn contains(&self, day: i64) -> bool {
        self.0.binary_search(&day).is_ok()
    }

    /// Distinct days.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No day at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The days, ascending.
    pub fn iter(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().copied()
    }
}

/// Bounds applied to a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most readings in one batch.
    pub max_readings: usize,
    /// How far ahead of the validator's clock a device timestamp may be, in ns.
    pub max_future_ns: i64,
    /// Most distinct UTC days the readings of one batch (and of one HTTP request) fall on.
    /// Storage writes a file per tenant and day a commit touches: without this bound one
    /// batch of readings spread over years would make one commit write thousands of files
    /// and stall every tenant's commits behind it. A week of buffered readings fits.
    pub max_days: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_readings: 100_000,
            max_future_ns: 3_600_000_000_000,
            max_days: DEFAULT_MAX_DAYS,
        }
    }
}

/// [`Limits::max_days`] by default: a week of buffered readings and the day it is sent.
pub const DEFAULT_MAX_DAYS: usize = 8;

/// What is wrong; stable names, used as metric labels and in HTTP error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The tenant id breaks the tenant rule.
    Tenant,
    /// Column lengths differ, or the batch is empty or too large.
    Shape,
    /// An index points outside its dictionary.
    Index,
    /// A device or metric name is empty, too long or contains control characters.
    Name,
    /// A timestamp is before 2000 or too far in the future.
    Timestamp,
    /// A value is NaN or infinite.
    Value,
    /// The readings fall on more UTC days than [`Limits::max_days`].
    Days,
}

impl Problem {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Tenant => "tenant",
            Problem::Shape => "shape",
            Problem::Index => "index",
            Problem::Name => "name",
            Problem::Timestamp => "timestamp",
            Problem::Value => "value",
            Problem::Days => "days",
        }
    }
}

/// A rule broken by a batch: the first one found.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    /// Which rule.
    pub problem: Problem,
    /// Index of the offending reading, when the rule is about one reading.
    pub reading: Option<usize>,
    /// Human-readable detail.
    pub detail: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reading {
            Some(i) => write!(f, "reading {i}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for Invalid {}

fn invalid(problem: Problem, reading: Option<usize>, detail: String) -> Invalid {
    Invalid {
        problem,
        reading,
        detail,
    }
}

/// Checks a device or metric name; `what` is "device" or "metric" for the message.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{what} name is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} name {name:?} contains control characters"));
    }
    Ok(())
}

/// Checks a device timestamp against `now_ns`.
pub fn check_timestamp(ts: i64, now_ns: i64, limits: &Limits) -> Result<(), String> {
    if ts < MIN_TIMESTAMP_NS {
        return Err(format!(
            "timestamp {ts} ns is before 2000-01-01T00:00:00Z (timestamps are nanoseconds since the Unix epoch)"
        ));
    }
    if ts > now_ns.saturating_add(limits.max_future_ns) {
        return Err(format!(
            "timestamp {ts} ns is more than {} s in the future",
            limits.max_future_ns / 1_000_000_000
        ));
    }
    Ok(())
}

/// Checks a value.
pub fn check_value(x: f64) -> Result<(), String> {
    if x.is_nan() {
        Err("value is NaN".to_owned())
    } else if x.is_infinite() {
        Err("value is infinite".to_owned())
    } else {
        Ok(())
    }
}

/// Checks every rule on a decoded batch; the UTC days its readings fall on.
pub fn validate(batch: &BatchView<'_>, now_ns: i64, limits: &Limits) -> Result<DaySet, Invalid> {
    if !TenantId::is_valid(batch.tenant) {
        return Err(invalid(
            Problem::Tenant,
            None,
            format!("invalid tenant id {:?}", batch.tenant),
        ));
    }
    let n = batch.d.len();
    if batch.m.len() != n || batch.t.len() != n || batch.x.len() != n {
        return Err(invalid(
            Problem::Shape,
            None,
            format!(
                "columns differ in length: d={} m={} t={} x={}",
                n,
                batch.m.len(),
                batch.t.len(),
                batch.x.len()
            ),
        ));
    }
    if n == 0 || n > limits.max_readings {
        return Err(invalid(
            Problem::Shape,
            None,
            format!(
                "batch holds {n} readings; allowed 1 to {}",
                limits.max_readings
            ),
        ));
    }
    for (what, dict) in [("device", &batch.devices), ("metric", &batch.metrics)] {
        for name in dict.iter() {
            check_name(what, name).map_err(|d| invalid(Problem::Name, None, d))?;
        }
    }
    let (nd, nm) = (batch.devices.len() as u32, batch.metrics.len() as u32);
    for i in 0..n {
        if batch.d[i] >= nd {
            return Err(invalid(
                Problem::Index,
                Some(i),
                format!(
                    "device index {} outside the {nd}-entry dictionary",
                    batch.d[i]
                ),
            ));
        }
        if batch.m[i] >= nm {
            return Err(invalid(
                Problem::Index,
                Some(i),
                format!(
                    "metric index {} outside the {nm}-entry dictionary",
                    batch.m[i]
                ),
            ));
        }
        check_timestamp(batch.t[i], now_ns, limits)
            .map_err(|d| invalid(Problem::Timestamp, Some(i), d))?;
        check_value(batch.x[i]).map_err(|d| invalid(Problem::Value, Some(i), d))?;
    }
    check_days(&batch.t, limits).map_err(|d| invalid(Problem::Days, None, d))
}

/// Checks that readings at `ts` fall on at most [`Limits::max_days`] UTC days.
pub fn check_days(ts: &[i64], limits: &Limits) -> Result<DaySet, String> {
    DaySet::of(ts, limits.max_days.max(1)).map_err(|_| {
        let max = limits.max_days.max(1);
        format!(
            "the readings fall on more than {max} UTC days (at most {max} per batch or \
             request); send a backfill in parts of at most {max} days each"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const NOW: i64 = 1_763_762_400_000_000_000;

    fn view() -> BatchView<'static> {
        BatchView {
            v: 1,
            id: Uuid::nil(),
            producer: "p",
            seq: 0,
            created: NOW,
            tenant: "acme",
            devices: vec!["d1", "d2"],
            metrics: vec!["temp"],
            d: vec![0, 1],
            m: vec![0, 0],
            t: vec![NOW - 1, NOW],
            x: vec![1.0, 2.0],
        }
    }

    fn problem(b: &BatchView<'_>) -> Option<(Problem, Option<usize>)> {
        // Ok holds the batch's days: NOW's, once.
        if let Ok(days) = validate(b, NOW, &Limits::default()) {
            assert!(!days.is_empty());
        }
        validate(b, NOW, &Limits::default())
            .err()
            .map(|e| (e.problem, e.reading))
    }

    #[test]
    fn valid_batch_passes() {
        assert_eq!(problem(&view()), None);
    }

    #[test]
    fn each_rule_is_reported() {
        let mut b = view();
        b.tenant = "Bad Tenant";
        assert_eq!(problem(&b), Some((Problem::Tenant, None)));

        let mut b = view();
        b.x.pop();
        assert_eq!(problem(&b), Some((Problem::Shape, None)));

        let mut b = view();
        b.d.clear();
        b.m.clear();
        b.t.clear();
        b.x.clear();
        assert_eq!(problem(&b), Some((Problem::Shape, None)));

        let mut b = view();
        b.d[1] = 2;
        assert_eq!(problem(&b), Some((Problem::Index, Some(1))));

        let mut b = view();
        b.devices[0] = "";
        assert_eq!(problem(&b), Some((Problem::Name, None)));

        let mut b = view();
        b.metrics[0] = "te\nmp";
        assert_eq!(problem(&b), Some((Problem::Name, None)));

        let mut b = view();
        b.t[0] = 1_000; // 1970: almost certainly seconds or ms sent as ns
        assert_eq!(problem(&b), Some((Problem::Timestamp, Some(0))));

        let mut b = view();
        b.t[1] = NOW + 2 * 3_600_000_000_000;
        assert_eq!(problem(&b), Some((Problem::Timestamp, Some(1))));

        let mut b = view();
        b.x[1] = f64::NAN;
        assert_eq!(problem(&b), Some((Problem::Value, Some(1))));

        let mut b = view();
        b.x[0] = f64::NEG_INFINITY;
        assert_eq!(problem(&b), Some((Problem::Value, Some(0))));

        // Nine readings on nine days, one over the default bound.
        let mut b = view();
        b.d = vec![0; 9];
        b.m = vec![0; 9];
        b.x = vec![1.0; 9];
        b.t = (0..9).map(|i| NOW - i * NS_PER_DAY).collect();
        assert_eq!(problem(&b), Some((Problem::Days, None)));
        b.t[8] = b.t[0] + 1; // back to eight days
        assert_eq!(problem(&b), None);
    }

    #[test]
    fn day_sets_count_distinct_utc_days() {
        let midnight = 20_000 * NS_PER_DAY;
        let ts = [
            midnight - 1,
            midnight,
            midnight + 5,
            midnight - 2,
            3 * NS_PER_DAY,
        ];
        let days = DaySet::of(&ts, 8).expect("3 days");
        assert_eq!(days.iter().collect::<Vec<_>>(), vec![3, 19_999, 20_000]);
        assert_eq!(DaySet::of(&ts, 2), Err(3));
        assert_eq!(utc_day(-1), -1, "before 1970 rounds down");
        let err = check_days(
            &ts,
            &Limits {
                max_days: 2,
                ..Limits::default()
            },
        )
        .expect_err("over");
        assert!(err.contains("more than 2 UTC days"), "{err}");
    }

    #[test]
    fn long_names_are_refused() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(check_name("device", &long).is_err());
        assert!(check_name("device", &long[..MAX_NAME_BYTES]).is_ok());
    }
}
