//! The latest value per (tenant, device, metric): in Redis, or in memory for the embedded
//! mode without Redis.
//!
//! [`LatestStore::update`] first reduces its batches in memory to the newest reading per
//! series (by device timestamp), then writes each series once. A reading never replaces a
//! newer one, whatever the order batches arrive or are redelivered in; on equal timestamps
//! the reading stored first stays (so a redelivery writes nothing).
//!
//! # Redis layout
//!
//! | | |
//! |---|---|
//! | key | hash `<prefix>:latest:<tenant>:<device>` (prefix default `sluice`) |
//! | field | `<metric>` |
//! | value | `"<ts_ns, 20 digits zero padded>|<value>"`, e.g. `"01795255200000000000|12.5"` |
//!
//! The zero-padded timestamp lets the compare-and-set Lua script ([`UPDATE_SCRIPT`]) order
//! readings by comparing strings: Lua numbers are doubles and lose precision above 2^53 ns
//! (about 104 days after the epoch). One `EVALSHA` per device hash carries all of that
//! device's metrics; the calls of one update are pipelined. Tenant ids never contain `:`,
//! so `SCAN MATCH <prefix>:latest:<tenant>:*` finds exactly one tenant's devices.
//!
//! # Series per tenant
//!
//! Redis memory is every tenant's, so a tenant keeps at most
//! [`DEFAULT_MAX_SERIES_PER_TENANT`] series (settable, 0 for none). The script counts each
//! series it creates in `<prefix>:latest-series:<tenant>` and creates none past the cap;
//! the readings are stored in the table all the same, and the update reports what it
//! refused per tenant (counted by the storage pool). The counter counts series created
//! since it exists: series stored before it are not in it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use arrow::array::{Array, AsArray, DictionaryArray, StringArray};
use arrow::datatypes::{Float64Type, Int32Type, TimestampNanosecondType};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};

use crate::columns::{DEVICE_IDX, METRIC_IDX, TS_IDX, VALUE_IDX};
use crate::{SchemaMismatch, StagedBatch, conform_rows};
use sluice_binding::model::{InvalidTenantId, TenantId};

/// Default Redis key prefix.
pub const DEFAULT_PREFIX: &str = "sluice";

/// Compare-and-set of a device hash. `KEYS[1]` is the hash, `KEYS[2]` the tenant's series
/// counter; `ARGV[1]` the tenant's cap on series (0: none), then metric and value
/// alternate. A field is written only if its stored timestamp (the first 20 characters) is
/// older; a new field only while the counter is below the cap, and it is counted. Returns
/// `{written, refused}`.
pub const UPDATE_SCRIPT: &str = r"
local cap = tonumber(ARGV[1])
local written, refused = 0, 0
for i = 2, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if not current then
    if cap > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= cap then
      refused = refused + 1
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
      redis.call('INCR', KEYS[2])
      written = written + 1
    end
  elseif string.sub(current, 1, 20) < string.sub(ARGV[i + 1], 1, 20) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    written = written + 1
  end
end
return {written, refused}
";

/// Series a tenant keeps latest values of, by default (see the module docs).
pub const DEFAULT_MAX_SERIES_PER_TENANT: u64 = 1_000_000;

/// What an update did not store: new series past their tenant's cap, by tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    /// Tenant → series refused by this update.
    pub series: BTreeMap<String, u64>,
}

/// Devices per pipeline: bounds the size of one request and of its reply.
const PIPELINE_DEVICES: usize = 1024;

/// Errors of the latest-value store.
#[derive(Debug, thiserror::Error)]
pub enum LatestError {
    /// A batch or a lookup names an invalid tenant id.
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),
    /// A batch's rows do not have the readings schema.
    #[error(transparent)]
    Schema(#[from] SchemaMismatch),
    /// A timestamp before the Unix epoch: the zero-padded encoding cannot order it (the
    /// binding only admits timestamps from 2000 on).
    #[error("timestamp {0} ns is before the Unix epoch")]
    NegativeTimestamp(i64),
    /// The key prefix is empty.
    #[error("the Redis key prefix must not be empty")]
    EmptyPrefix,
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A stored value is not `<ts>|<value>`.
    #[error("malformed latest value {value:?} in {key} field {field}")]
    Corrupt {
        /// The hash.
        key: String,
        /// The field (metric).
        field: String,
        /// The stored value.
        value: String,
    },
}

/// The latest reading of one metric of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    /// Metric name.
    pub metric: String,
    /// Device timestamp, ns since the Unix epoch (UTC).
    pub ts_ns: i64,
    /// Value.
    pub value: f64,
}

/// The latest readings of one device, by metric name.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLatest {
    /// Device id.
    pub device: String,
    /// One entry per metric, sorted by metric name.
    pub readings: Vec<Latest>,
}

/// Where latest values live.
#[derive(Debug, Clone)]
pub enum LatestStore {
    /// Redis, shared by every process of the deployment.
    Redis(RedisLatest),
    /// This process's memory (embedded mode without Redis).
    Memory(MemoryLatest),
}

impl LatestStore {
    /// An empty in-memory store.
    pub fn memory() -> Self {
        Self::Memory(MemoryLatest::default())
    }

    /// Caps the series each tenant keeps at `n` (0: no cap); the default is
    /// [`DEFAULT_MAX_SERIES_PER_TENANT`].
    pub fn with_max_series_per_tenant(self, n: u64) -> Self {
        match self {
            Self::Redis(mut r) => {
                r.max_series = n;
                Self::Redis(r)
            }
            Self::Memory(m) => {
                m.state
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .max_series = Some(n);
                Self::Memory(m)
            }
        }
    }

    /// Records the newest reading per series of `batches`, unless a newer one is stored;
    /// returns the new series refused by their tenant's cap.
    pub async fn update(&self, batches: &[StagedBatch]) -> Result<Refused, LatestError> {
        let newest = reduce(batches)?;
        match self {
            Self::Redis(r) => r.write(newest).await,
            Self::Memory(m) => Ok(m.write(newest)),
        }
    }

    /// The latest readings of one device, sorted by metric; empty if unknown.
    pub async fn get(&self, tenant: &str, device: &str) -> Result<Vec<Latest>, LatestError> {
        TenantId::check(tenant)?;
        match self {
            Self::Redis(r) => r.get(tenant, device).await,
            Self::Memory(m) => Ok(m.get(tenant, device)),
        }
    }

    /// The latest readings of every device of a tenant, sorted by device.
    pub async fn get_all_for_tenant(&self, tenant: &str) -> Result<Vec<DeviceLatest>, LatestError> {
        Ok(self.find(tenant, &LatestFilter::default()).await?.devices)
    }

    /// One page of a tenant's devices that match `filter`, sorted by device, each with
    /// its matching metrics (a device none of whose metrics match is left out).
    pub async fn find(
        &self,
        tenant: &str,
        filter: &LatestFilter,
    ) -> Result<LatestPage, LatestError> {
        TenantId::check(tenant)?;
        let mut devices = match self {
            Self::Redis(r) => r.find(tenant, filter).await?,
            Self::Memory(m) => m.find(tenant, filter),
        };
        // Both sides return the page's candidates sorted by device, at most limit + 1.
        let more = devices.len() > filter.limit;
        devices.truncate(filter.limit);
        Ok(LatestPage { devices, more })
    }
}

/// A glob over device or metric names: `*` matches any run of characters, `?` one
/// character; every other character matches itself.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    matcher: wildmatch::WildMatch,
}

impl Pattern {
    /// The pattern `text`.
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            matcher: wildmatch::WildMatch::new(text),
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.matcher.matches(name)
    }

    /// The pattern as a Redis `MATCH` glob: `*` and `?` kept, Redis' other metacharacters
    /// (`[`, `]`, `\`) escaped so they match themselves as here.
    fn redis_glob(&self) -> String {
        let mut out = String::with_capacity(self.text.len());
        for c in self.text.chars() {
            if matches!(c, '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }
}

/// Which latest values [`LatestStore::find`] returns.
#[derive(Debug, Clone)]
pub struct LatestFilter {
    /// Devices whose name matches; `None`: every device.
    pub device: Option<Pattern>,
    /// Metrics whose name matches; `None`: every metric.
    pub metric: Option<Pattern>,
    /// Only devices whose name sorts after this one (the previous page's last device).
    pub after: Option<String>,
    /// Devices per page.
    pub limit: usize,
}

impl Default for LatestFilter {
    fn default() -> Self {
        Self {
            device: None,
            metric: None,
            after: None,
            limit: usize::MAX - 1,
        }
    }
}

impl LatestFilter {
    fn keeps_device(&self, device: &str) -> bool {
        self.after.as_deref().is_none_or(|a| device > a)
            && self.device.as_ref().is_none_or(|p| p.matches(device))
    }

    fn keeps_metric(&self, metric: &str) -> bool {
        self.metric.as_ref().is_none_or(|p| p.matches(metric))
    }
}

/// One page of [`LatestStore::find`].
#[derive(Debug, Clone, PartialEq)]
pub struct LatestPage {
    /// The devices, sorted by name.
    pub devices: Vec<DeviceLatest>,
    /// More devices match after the last one (ask again with `after` set to it).
    pub more: bool,
}

/// Newest reading per series: `(tenant, device) -> metric -> (ts, value)`.
type Newest = BTreeMap<(String, String), HashMap<String, (i64, f64)>>;

/// Reduces batches to the newest reading per series; on equal timestamps the first wins.
fn reduce(batches: &[StagedBatch]) -> Result<Newest, LatestError> {
    let mut newest = Newest::new();
    for batch in batches {
        TenantId::check(&batch.tenant)?;
        let rows = conform_rows(batch.batch_id, &batch.rows)?;
        let schema_error = |reason: &str| SchemaMismatch {
            batch_id: batch.batch_id,
            reason: reason.to_owned(),
        };
        let dictionary =
            |index: usize| -> Result<(&DictionaryArray<Int32Type>, &StringArray), SchemaMismatch> {
                let dict = rows
                    .column(index)
                    .as_dictionary_opt::<Int32Type>()
                    .ok_or_else(|| schema_error("tag column is not Dictionary(Int32, _)"))?;
                let values = dict
                    .values()
                    .as_string_opt::<i32>()
                    .ok_or_else(|| schema_error("tag dictionary values are not Utf8"))?;
                Ok((dict, values))
            };
        let (devices, device_names) = dictionary(DEVICE_IDX)?;
        let (metrics, metric_names) = dictionary(METRIC_IDX)?;
        let ts = rows
            .column(TS_IDX)
            .as_primitive_opt::<TimestampNanosecondType>()
            .ok_or_else(|| schema_error("ts is not Timestamp(ns)"))?
            .values();
        let values = rows
            .column(VALUE_IDX)
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| schema_error("value is not Float64"))?
            .values();

        // Reduce on dictionary keys first (integers, no allocation per row), then resolve the
        // names once per series of this batch.
        let mut local: HashMap<(i32, i32), (i64, f64)> = HashMap::new();
        let (device_keys, metric_keys) = (devices.keys().values(), metrics.keys().values());
        for i in 0..rows.num_rows() {
            let reading = (ts[i], values[i]);
            if reading.0 < 0 {
                return Err(LatestError::NegativeTimestamp(reading.0));
            }
            local
                .entry((device_keys[i], metric_keys[i]))
                .and_modify(|best| {
                    if reading.0 > best.0 {
                        *best = reading;
                    }
                })
                .or_insert(reading);
        }
        for ((device, metric), reading) in local {
            let name = |names: &StringArray, key: i32| {
                usize::try_from(key)
                    .ok()
                    .filter(|&k| k < names.len())
                    .map(|k| names.value(k).to_owned())
                    .ok_or_else(|| schema_error("dictionary key out of range"))
            };
            let series = newest
                .entry((batch.tenant.clone(), name(device_names, device)?))
                .or_default();
            series
                .entry(name(metric_names, metric)?)
                .and_modify(|best| {
                    if reading.0 > best.0 {
                        *best = reading;
                    }
                })
                .or_insert(reading);
        }
    }
    Ok(newest)
}

/// `"<ts_ns 20 digits>|<value>"`. Debug formatting of f64 is the shortest string that
/// parses back to the same value.
fn encode(ts_ns: i64, value: f64) -> String {
    format!("{ts_ns:020}|{value:?}")
}

fn decode(key: &str, field: String, raw: String) -> Result<Latest, LatestError> {
    let parsed = raw
        .split_once('|')
        .and_then(|(ts, value)| Some((ts.parse().ok()?, value.parse().ok()?)));
    match parsed {
        Some((ts_ns, value)) => Ok(Latest {
            metric: field,
            ts_ns,
            value,
        }),
        None => Err(LatestError::Corrupt {
            key: key.to_owned(),
            field,
            value: raw,
        }),
    }
}

/// Latest values in Redis. Cheap to clone (the connection manager is shared).
#[derive(Clone)]
pub struct RedisLatest {
    conn: ConnectionManager,
    prefix: String,
    script: Arc<Script>,
    max_series: u64,
}

impl std::fmt::Debug for RedisLatest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLatest")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisLatest {
    /// Uses `conn` with key prefix `prefix` (e.g. [`DEFAULT_PREFIX`]) and loads the update
    /// script.
    pub async fn new(
        conn: ConnectionManager,
        prefix: impl Into<String>,
    ) -> Result<Self, LatestError> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Err(LatestError::EmptyPrefix);
        }
        let this = Self {
            conn,
            prefix,
            script: Arc::new(Script::new(UPDATE_SCRIPT)),
            max_series: DEFAULT_MAX_SERIES_PER_TENANT,
        };
        this.script.load_async(&mut this.conn.clone()).await?;
        Ok(this)
    }

    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`); the connection manager reconnects
    /// by itself after failures, at most 1 s apart (its default backoff grows to 3.2 s,
    /// which kept commits waiting seconds after Redis was back).
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, LatestError> {
        let client = redis::Client::open(url)?;
        let cfg = ConnectionManagerConfig::new().set_max_delay(std::time::Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, cfg).await?;
        Self::new(conn, prefix).await
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, tenant: &str, device: &str) -> String {
        format!("{}:latest:{tenant}:{device}", self.prefix)
    }

    fn series_key(&self, tenant: &str) -> String {
        format!("{}:latest-series:{tenant}", self.prefix)
    }

    async fn write(&self, newest: Newest) -> Result<Refused, LatestError> {
        let mut conn = self.conn.clone();
        let mut refused = Refused::default();
        let mut calls = newest.into_iter().peekable();
        while calls.peek().is_some() {
            let mut pipe = redis::pipe();
            let mut tenants = Vec::with_capacity(PIPELINE_DEVICES);
            for ((tenant, device), metrics) in calls.by_ref().take(PIPELINE_DEVICES) {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.script.get_hash())
                    .arg(2)
                    .arg(self.key(&tenant, &device))
                    .arg(self.series_key(&tenant))
                    .arg(self.max_series);
                for (metric, (ts, value)) in metrics {
                    cmd.arg(metric).arg(encode(ts, value));
                }
                pipe.add_command(cmd);
                tenants.push(tenant);
            }
            let replies: Vec<(u64, u64)> = match pipe.query_async(&mut conn).await {
                // Redis lost its script cache (restart, failover, SCRIPT FLUSH). The script
                // is idempotent, so reloading and resending the whole pipeline is safe.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    self.script.load_async(&mut conn).await?;
                    pipe.query_async(&mut conn).await?
                }
                result => result?,
            };
            for (tenant, (_, n)) in tenants.into_iter().zip(replies) {
                if n > 0 {
                    *refused.series.entry(tenant).or_default() += n;
                }
            }
        }
        Ok(refused)
    }

    async fn get(&self, tenant: &str, device: &str) -> Result<Vec<Latest>, LatestError> {
        let key = self.key(tenant, device);
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut readings = fields
            .into_iter()
            .map(|(field, raw)| decode(&key, field, raw))
            .collect::<Result<Vec<_>, _>>()?;
        readings.sort_by(|a, b| a.metric.cmp(&b.metric));
        Ok(readings)
    }

    /// SCANs the tenant's device keys that match the device pattern (key names only),
    /// then reads the hashes of the page's devices, skipping those with no matching
    /// metric, until `limit + 1` devices are found.
    async fn find(
        &self,
        tenant: &str,
        filter: &LatestFilter,
    ) -> Result<Vec<DeviceLatest>, LatestError> {
        let mut conn = self.conn.clone();
        let key_prefix = self.key(tenant, "");
        let pattern = format!(
            "{}{}",
            glob_escape(&key_prefix),
            filter
                .device
                .as_ref()
                .map_or("*".to_owned(), Pattern::redis_glob)
        );
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(
                batch
                    .into_iter()
                    .filter(|k| filter.keeps_device(&k[key_prefix.len()..])),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key more than once.
        keys.sort();
        keys.dedup();

        let want = filter.limit.saturating_add(1);
        let mut devices = Vec::new();
        for chunk in keys.chunks(PIPELINE_DEVICES) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HGETALL").arg(key);
            }
            let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
            for (key, fields) in chunk.iter().zip(hashes) {
                let mut readings = fields
                    .into_iter()
                    .filter(|(field, _)| filter.keeps_metric(field))
                    .map(|(field, raw)| decode(key, field, raw))
                    .collect::<Result<Vec<_>, _>>()?;
                if readings.is_empty() {
                    continue; // no matching metric, or deleted between SCAN and HGETALL
                }
                readings.sort_by(|a, b| a.metric.cmp(&b.metric));
                devices.push(DeviceLatest {
                    device: key[key_prefix.len()..].to_owned(),
                    readings,
                });
                if devices.len() == want {
                    return Ok(devices);
                }
            }
        }
        Ok(devices)
    }
}

/// Escapes Redis glob metacharacters, so a prefix matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// device -> metric -> (ts, value).
type TenantValues = HashMap<String, HashMap<String, (i64, f64)>>;

/// Latest values in this process's memory. Cheap to clone; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct MemoryLatest {
    /// A `std` lock: it is never held across an `.await` (every method is synchronous
    /// inside).
    state: Arc<RwLock<MemoryState>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// tenant -> device -> metric -> (ts, value).
    values: HashMap<String, TenantValues>,
    /// Series held per tenant.
    series: HashMap<String, u64>,
    /// The cap on series per tenant (`None`: the default; 0: none).
    max_series: Option<u64>,
}

impl MemoryLatest {
    fn write(&self, newest: Newest) -> Refused {
        let mut refused = Refused::default();
        let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let cap = state.max_series.unwrap_or(DEFAULT_MAX_SERIES_PER_TENANT);
        for ((tenant, device), metrics) in newest {
            let held = state.series.entry(tenant.clone()).or_default();
            let series = state
                .values
                .entry(tenant.clone())
                .or_default()
                .entry(device)
                .or_default();
            for (metric, reading) in metrics {
                match series.get_mut(&metric) {
                    Some(stored) => {
                        if reading.0 > stored.0 {
                            *stored = reading;
                        }
                    }
                    None if cap > 0 && *held >= cap => {
                        *refused.series.entry(tenant.clone()).or_default() += 1;
                    }
                    None => {
                        series.insert(metric, reading);
                        *held += 1;
                    }
                }
            }
        }
        refused
    }

    fn device(metrics: &HashMap<String, (i64, f64)>) -> Vec<Latest> {
        let mut readings: Vec<Latest> = metrics
            .iter()
            .map(|(metric, &(ts_ns, value))| Latest {
                metric: metric.clone(),
                ts_ns,
                value,
            })
            .collect();
        readings.sort_by(|a, b| a.metric.cmp(&b.metric));
        readings
    }

    fn get(&self, tenant: &str, device: &str) -> Vec<Latest> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .values
            .get(tenant)
            .and_then(|devices| devices.get(device))
            .map(Self::device)
            .unwrap_or_default()
    }

    fn find(&self, tenant: &str, filter: &LatestFilter) -> Vec<DeviceLatest> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let values = &state.values;
        let mut names: Vec<&String> = values
            .get(tenant)
            .into_iter()
            .flat_map(|devices| devices.keys())
            .filter(|d| filter.keeps_device(d))
            .collect();
        names.sort();
        let want = filter.limit.saturating_add(1);
        let mut devices = Vec::new();
        for device in names {
            let mut readings = Self::device(&values[tenant][device]);
            readings.retain(|r| filter.keeps_metric(&r.metric));
            if readings.is_empty() {
                continue;
            }
            devices.push(DeviceLatest {
                device: device.clone(),
                readings,
            });
            if devices.len() == want {
                break;
            }
        }
        devices
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{HOUR_10, rows, staged};

    fn latest(metric: &str, ts_ns: i64, value: f64) -> Latest {
        Latest {
            metric: metric.to_owned(),
            ts_ns,
            value,
        }
    }

    #[tokio::test]
    async fn memory_caps_each_tenant_s_series() {
        let store = LatestStore::memory().with_max_series_per_tenant(2);
        let refused = store
            .update(&[
                staged(
                    "acme",
                    rows(&[("d1", "a", HOUR_10, 1.0), ("d1", "b", HOUR_10, 2.0)]),
                ),
                staged("acme", rows(&[("d2", "a", HOUR_10, 3.0)])),
                staged("globex", rows(&[("d2", "a", HOUR_10, 4.0)])),
            ])
            .await
            .unwrap();
        assert_eq!(
            refused.series.into_iter().collect::<Vec<_>>(),
            [("acme".to_owned(), 1)]
        );
        assert!(store.get("acme", "d2").await.unwrap().is_empty());
        let refused = store
            .update(&[staged("acme", rows(&[("d1", "a", HOUR_10 + 1, 5.0)]))])
            .await
            .unwrap();
        assert!(
            refused.series.is_empty(),
            "a known series still moves forward"
        );
        assert_eq!(
            store.get("acme", "d1").await.unwrap()[0],
            latest("a", HOUR_10 + 1, 5.0)
        );
        assert_eq!(store.get("globex", "d2").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn memory_keeps_the_newest_and_never_regresses() {
        let store = LatestStore::memory();
        // Within one update: out of order rows and several batches.
        store
            .update(&[
                staged(
                    "acme",
                    rows(&[
                        ("d1", "kwh", HOUR_10 + 5, 5.0),
                        ("d1", "kwh", HOUR_10 + 9, 9.0),
                        ("d1", "kwh", HOUR_10 + 7, 7.0),
                        ("d1", "volt", HOUR_10, 230.0),
                        ("d2", "kwh", HOUR_10, 1.0),
                    ]),
                ),
                staged("acme", rows(&[("d1", "kwh", HOUR_10 + 8, 8.0)])),
                staged("other", rows(&[("d1", "kwh", HOUR_10 + 100, 100.0)])),
            ])
            .await
            .expect("update");
        assert_eq!(
            store.get("acme", "d1").await.expect("get"),
            vec![
                latest("kwh", HOUR_10 + 9, 9.0),
                latest("volt", HOUR_10, 230.0)
            ]
        );

        // A later update with older readings (redelivery, late data) changes nothing; an
        // equal timestamp keeps the first value; a newer one wins.
        store
            .update(&[staged(
                "acme",
                rows(&[
                    ("d1", "kwh", HOUR_10 + 1, -1.0),
                    ("d1", "volt", HOUR_10, -2.0),
                    ("d2", "kwh", HOUR_10 + 1, 2.0),
                ]),
            )])
            .await
            .expect("update");
        assert_eq!(
            store.get("acme", "d1").await.expect("get"),
            vec![
                latest("kwh", HOUR_10 + 9, 9.0),
                latest("volt", HOUR_10, 230.0)
            ]
        );
        assert_eq!(
            store.get_all_for_tenant("acme").await.expect("all"),
            vec![
                DeviceLatest {
                    device: "d1".into(),
                    readings: vec![
                        latest("kwh", HOUR_10 + 9, 9.0),
                        latest("volt", HOUR_10, 230.0)
                    ],
                },
                DeviceLatest {
                    device: "d2".into(),
                    readings: vec![latest("kwh", HOUR_10 + 1, 2.0)],
                },
            ]
        );
        assert!(store.get("acme", "nope").await.expect("get").is_empty());
        assert!(
            store
                .get_all_for_tenant("nobody")
                .await
                .expect("all")
                .is_empty()
        );
        assert!(store.get("../x", "d1").await.is_err());
    }

    #[tokio::test]
    async fn find_filters_by_patterns_and_pages_by_device() {
        let store = LatestStore::memory();
        store
            .update(&[staged(
                "acme",
                rows(&[
                    ("pump-1", "temp", HOUR_10, 1.0),
                    ("pump-1", "rpm", HOUR_10, 2.0),
                    ("pump-2", "temp", HOUR_10, 3.0),
                    ("pump-10", "rpm", HOUR_10, 4.0),
                    ("valve[1]", "temp", HOUR_10, 5.0),
                ]),
            )])
            .await
            .expect("update");
        let names = |page: &LatestPage| {
            page.devices
                .iter()
                .map(|d| {
                    let metrics: Vec<&str> = d.readings.iter().map(|r| r.metric.as_str()).collect();
                    format!("{}:{}", d.device, metrics.join(","))
                })
                .collect::<Vec<_>>()
        };
        let find = |filter: LatestFilter| {
            let store = store.clone();
            async move { store.find("acme", &filter).await.expect("find") }
        };
        let page = find(LatestFilter {
            device: Some(Pattern::new("pump-?")),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(names(&page), ["pump-1:rpm,temp", "pump-2:temp"]);
        assert!(!page.more);

        // A device with no matching metric is left out.
        let page = find(LatestFilter {
            metric: Some(Pattern::new("t*")),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(
            names(&page),
            ["pump-1:temp", "pump-2:temp", "valve[1]:temp"]
        );

        // Brackets match themselves.
        let page = find(LatestFilter {
            device: Some(Pattern::new("valve[1]")),
            ..LatestFilter::default()
        })
        .await;
        assert_eq!(names(&page), ["valve[1]:temp"]);

        // Pages of two, by name.
        let mut filter = LatestFilter {
            limit: 2,
            ..LatestFilter::default()
        };
        let first = find(filter.clone()).await;
        assert_eq!(names(&first), ["pump-1:rpm,temp", "pump-10:rpm"]);
        assert!(first.more);
        filter.after = Some("pump-10".into());
        let second = find(filter.clone()).await;
        assert_eq!(names(&second), ["pump-2:temp", "valve[1]:temp"]);
        assert!(!second.more);
        assert!(
            store
                .find("other", &filter)
                .await
                .expect("find")
                .devices
                .is_empty()
        );
    }

    #[tokio::test]
    async fn negative_timestamps_are_rejected() {
        let store = LatestStore::memory();
        let err = store
            .update(&[staged("acme", rows(&[("d", "m", -1, 0.0)]))])
            .await
            .expect_err("negative");
        assert!(matches!(err, LatestError::NegativeTimestamp(-1)));
    }

    #[test]
    fn encoding_orders_as_strings_and_round_trips() {
        let a = encode(9_999_999_999, 1.0);
        let b = encode(10_000_000_000, -0.5);
        assert_eq!(a, "00000000009999999999|1.0");
        assert!(a[..20] < b[..20]);
        assert_eq!(encode(i64::MAX, 0.0), "09223372036854775807|0.0");
        for value in [0.1, -3.75e-300, 1e300, 12.5, f64::MIN_POSITIVE] {
            let decoded = decode("k", "m".into(), encode(HOUR_10, value)).expect("decode");
            assert_eq!(decoded, latest("m", HOUR_10, value));
        }
        assert!(decode("k", "m".into(), "garbage".into()).is_err());
    }

    #[test]
    fn glob_escaping() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(Pattern::new("a*b?[c]\\").redis_glob(), "a*b?\\[c\\]\\\\");
    }
}
