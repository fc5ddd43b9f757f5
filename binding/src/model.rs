//! The data model of the binding: a batch of readings of one tenant, stored column-wise.
//!
//! A reading is (device, metric, device timestamp, value). A batch holds the device and
//! metric names once, in dictionaries, and one position per reading in four parallel columns
//! (`d`, `m`, `t`, `x`). This is what goes on the wire (see `docs/binding.md`) and it maps
//! onto Arrow dictionary arrays without per-reading work.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the batch format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A tenant id: `[a-z0-9][a-z0-9_-]{0,62}`. Tenant ids become path segments and key
/// prefixes, so the charset is deliberately narrow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

/// Why a tenant id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant id {0:?}: expected [a-z0-9][a-z0-9_-]{{0,62}}")]
pub struct InvalidTenantId(pub String);

impl TenantId {
    /// Checks the charset and length rule.
    pub fn is_valid(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
    }

    /// Checks a borrowed id without taking it (storage, which keeps ids as strings).
    pub fn check(s: &str) -> Result<(), InvalidTenantId> {
        if Self::is_valid(s) {
            Ok(())
        } else {
            Err(InvalidTenantId(s.to_owned()))
        }
    }

    /// Parses a tenant id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidTenantId> {
        let s = s.into();
        if Self::is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(InvalidTenantId(s))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidTenantId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> Self {
        t.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A batch as a producer builds and sends it (owned strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Format version, [`FORMAT_VERSION`].
    pub v: u32,
    /// Batch id, the deduplication key; encoded as 16 raw bytes.
    #[serde(with = "uuid_bin")]
    pub id: Uuid,
    /// Producer id, stable across restarts of one producer.
    pub producer: String,
    /// Producer sequence number, increasing by one per batch.
    pub seq: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created: i64,
    /// Tenant the batch belongs to.
    pub tenant: String,
    /// Device dictionary.
    pub devices: Vec<String>,
    /// Metric dictionary.
    pub metrics: Vec<String>,
    /// Per reading: index into `devices`.
    pub d: Vec<u32>,
    /// Per reading: index into `metrics`.
    pub m: Vec<u32>,
    /// Per reading: device timestamp, ns since the Unix epoch.
    pub t: Vec<i64>,
    /// Per reading: value.
    pub x: Vec<f64>,
}

/// A decoded batch borrowing its strings from the message body: the consumer's hot path
/// (no allocation per device or metric name).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct BatchView<'a> {
    /// Format version.
    pub v: u32,
    /// Batch id.
    #[serde(with = "uuid_bin")]
    pub id: Uuid,
    /// Producer id.
    pub producer: &'a str,
    /// Producer sequence number.
    pub seq: u64,
    /// Creation time, ns since the Unix epoch.
    pub created: i64,
    /// Tenant id (not yet validated).
    pub tenant: &'a str,
    /// Device dictionary.
    #[serde(borrow)]
    pub devices: Vec<&'a str>,
    /// Metric dictionary.
    #[serde(borrow)]
    pub metrics: Vec<&'a str>,
    /// Per reading: device index.
    pub d: Vec<u32>,
    /// Per reading: metric index.
    pub m: Vec<u32>,
    /// Per reading: device timestamp (ns).
    pub t: Vec<i64>,
    /// Per reading: value.
    pub x: Vec<f64>,
}

impl BatchView<'_> {
    /// Number of readings (length of the `d` column; validation checks the others agree).
    pub fn len(&self) -> usize {
        self.d.len()
    }

    /// Whether the batch holds no reading.
    pub fn is_empty(&self) -> bool {
        self.d.is_empty()
    }
}

/// One reading in row form, as the HTTP front end and loadgen produce them.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading<'a> {
    /// Device id.
    pub device: Cow<'a, str>,
    /// Metric name.
    pub metric: Cow<'a, str>,
    /// Device timestamp, ns since the Unix epoch.
    pub ts: i64,
    /// Value.
    pub value: f64,
}

/// Builds a [`Batch`] from rows, interning device and metric names into the dictionaries.
#[derive(Debug)]
pub struct BatchBuilder {
    batch: Batch,
    device_ix: HashMap<String, u32>,
    metric_ix: HashMap<String, u32>,
}

impl BatchBuilder {
    /// Starts a batch for `tenant` from `producer` with sequence number `seq`.
    pub fn new(tenant: &str, producer: &str, seq: u64) -> Self {
        Self::with_capacity(tenant, producer, seq, 0)
    }

    /// Same as [`BatchBuilder::new`], reserving room for `readings` readings.
    pub fn with_capacity(tenant: &str, producer: &str, seq: u64, readings: usize) -> Self {
        Self {
            batch: Batch {
                v: FORMAT_VERSION,
                id: Uuid::now_v7(),
                producer: producer.to_owned(),
                seq,
                created: 0,
                tenant: tenant.to_owned(),
                devices: Vec::new(),
                metrics: Vec::new(),
                d: Vec::with_capacity(readings),
                m: Vec::with_capacity(readings),
                t: Vec::with_capacity(readings),
                x: Vec::with_capacity(readings),
            },
            device_ix: HashMap::new(),
            metric_ix: HashMap::new(),
        }
    }

    /// Appends one reading.
    pub fn push(&mut self, device: &str, metric: &str, ts: i64, value: f64) {
        let d = intern(&mut self.device_ix, &mut self.batch.devices, device);
        let m = intern(&mut self.metric_ix, &mut self.batch.metrics, metric);
        self.batch.d.push(d);
        self.batch.m.push(m);
        self.batch.t.push(ts);
        self.batch.x.push(value);
    }

    /// Number of readings so far.
    pub fn len(&self) -> usize {
        self.batch.d.len()
    }

    /// Whether no reading was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.batch.d.is_empty()
    }

    /// Finishes the batch, stamping its creation time (ns since the Unix epoch).
    pub fn finish(mut self, created_ns: i64) -> Batch {
        self.batch.created = created_ns;
        self.batch
    }
}

fn intern(ix: &mut HashMap<String, u32>, dict: &mut Vec<String>, name: &str) -> u32 {
    if let Some(i) = ix.get(name) {
        return *i;
    }
    let i = dict.len() as u32;
    dict.push(name.to_owned());
    ix.insert(name.to_owned(), i);
    i
}

/// Wall-clock now in nanoseconds since the Unix epoch (0 before the epoch, `i64::MAX`
/// after 2262): the clock every service stamps and checks timestamps with.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// (De)serializes a UUID as MessagePack `bin` of 16 bytes.
mod uuid_bin {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use uuid::Uuid;

    pub(super) fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(id.as_bytes())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Uuid;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("16 bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Uuid, E> {
                Uuid::from_slice(v).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        for ok in ["a", "acme", "acme-2_x", "0", &"a".repeat(63)] {
            assert!(TenantId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Acme",
            "-a",
            "_a",
            "a/b",
            "a.b",
            "a:b",
            "a*",
            "..",
            &"a".repeat(64),
            "é",
        ] {
            assert!(TenantId::new(bad).is_err(), "{bad}");
            assert_eq!(TenantId::check(bad), Err(InvalidTenantId(bad.to_owned())));
        }
    }

    #[test]
    fn builder_interns_names() {
        let mut b = BatchBuilder::new("acme", "p", 7);
        b.push("d1", "temp", 1, 1.0);
        b.push("d2", "temp", 2, 2.0);
        b.push("d1", "hum", 3, 3.0);
        let batch = b.finish(99);
        assert_eq!(batch.devices, vec!["d1", "d2"]);
        assert_eq!(batch.metrics, vec!["temp", "hum"]);
        assert_eq!(batch.d, vec![0, 1, 0]);
        assert_eq!(batch.m, vec![0, 0, 1]);
        assert_eq!(batch.created, 99);
        assert_eq!(batch.seq, 7);
    }
}
