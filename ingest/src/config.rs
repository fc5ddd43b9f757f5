//! [`IngestConfig`]: every knob of the HTTP front end, its batcher and its producer. The
//! listen address is not here: the binary binds the socket and hands over the listener.

use std::time::Duration;

use serde::Deserialize;
use sluice_binding::validate::Limits;

use sluice_binding::producer::ProducerConfig;

/// Largest `batch_max_readings`: even with every reading naming a new 256-byte device and
/// metric, a batch of this many readings encodes to about 11 MB, below the binding's 16 MiB
/// message limit.
pub const MAX_BATCH_READINGS: usize = 20_000;

/// Settings of `sluice ingest`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A batch is sent once it holds this many readings (default 1000, at most 20 000).
    pub batch_max_readings: usize,
    /// A batch is sent at the latest this long after its first reading arrived, full or
    /// not (humantime, default `"5ms"`): the latency a reading may wait for company.
    #[serde(with = "sluice_binding::config::duration")]
    pub batch_linger: Duration,
    /// Largest request body, in bytes (default 8 MiB); larger bodies get 413.
    pub max_body_bytes: usize,
    /// Most readings in one request (default 100 000); more get 413.
    pub max_readings_per_request: usize,
    /// Requests handled at once (default 1024); when all are taken, a request gets 503
    /// with `Retry-After` at once rather than waiting in an unbounded queue.
    pub max_inflight_requests: usize,
    /// Most requests one tenant may have in flight at once (its share of
    /// `max_inflight_requests`); beyond it that tenant gets 503 `overloaded` while the
    /// others keep theirs. 0 (the default) means half of `max_inflight_requests` when
    /// several tenants are served, all of it when one is.
    pub max_inflight_per_tenant: usize,
    /// Longest a request body may take to arrive once the request was admitted
    /// (humantime, default `"10s"`); a slower one gets 408 and frees its share.
    #[serde(with = "sluice_binding::config::duration")]
    pub body_read_timeout: Duration,
    /// Longest a client may take to send a request's line and headers (humantime, default
    /// `"10s"`); a slower connection is closed.
    #[serde(with = "sluice_binding::config::duration")]
    pub header_read_timeout: Duration,
    /// Connections open at once (default 4096; keep it below the open-files limit); more
    /// wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Batches published and awaiting their broker confirm at once (default 256).
    pub max_inflight_batches: usize,
    /// `Retry-After` of 503 answers, in seconds (default 1).
    pub retry_after_secs: u64,
    /// How far ahead of this server's clock a device timestamp may be (humantime,
    /// default `"1h"`, the consumers' default: a reading ingest accepts is not
    /// dead-lettered downstream).
    #[serde(with = "sluice_binding::config::duration")]
    pub max_future_skew: Duration,
    /// Most distinct UTC days the readings of one request may fall on (default 8, the
    /// consumers' default); more get 422 `too_many_days`. Batches never mix more days
    /// either: storage writes a file per tenant and day, and readings spread over years
    /// would otherwise make one commit write thousands of files.
    pub max_days_per_batch: usize,
    /// The producer: id, partitioning, retries.
    pub producer: ProducerConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_max_readings: 1000,
            batch_linger: Duration::from_millis(5),
            max_body_bytes: 8 * 1024 * 1024,
            max_readings_per_request: 100_000,
            max_inflight_requests: 1024,
            max_inflight_per_tenant: 0,
            body_read_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_inflight_batches: 256,
            retry_after_secs: 1,
            max_future_skew: Duration::from_secs(3600),
            max_days_per_batch: sluice_binding::validate::DEFAULT_MAX_DAYS,
            producer: ProducerConfig::default(),
        }
    }
}

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ingest setting {field}: {problem}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl IngestConfig {
    /// Checks the ranges; [`crate::AppState::new`] clamps instead, so call this where a
    /// configuration is read to tell the operator.
    pub fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("batch_max_readings", self.batch_max_readings),
            ("max_body_bytes", self.max_body_bytes),
            ("max_readings_per_request", self.max_readings_per_request),
            ("max_inflight_requests", self.max_inflight_requests),
            ("max_inflight_batches", self.max_inflight_batches),
            ("max_connections", self.max_connections),
            ("max_days_per_batch", self.max_days_per_batch),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(ConfigError {
                    field,
                    problem: "must be at least 1".into(),
                });
            }
        }
        if self.batch_max_readings > MAX_BATCH_READINGS {
            return Err(ConfigError {
                field: "batch_max_readings",
                problem: format!(
                    "{} is above {MAX_BATCH_READINGS} (batches must stay below the 16 MiB message limit)",
                    self.batch_max_readings
                ),
            });
        }
        if self.producer.producer_id.len() > 128 {
            return Err(ConfigError {
                field: "producer.producer_id",
                problem: "longer than 128 bytes".into(),
            });
        }
        Ok(())
    }

    /// The configuration with every value brought into its range.
    pub(crate) fn clamped(mut self) -> Self {
        self.batch_max_readings = self.batch_max_readings.clamp(1, MAX_BATCH_READINGS);
        self.max_body_bytes = self.max_body_bytes.max(1);
        self.max_readings_per_request = self.max_readings_per_request.max(1);
        self.max_inflight_requests = self.max_inflight_requests.max(1);
        self.max_inflight_batches = self.max_inflight_batches.max(1);
        self.body_read_timeout = self.body_read_timeout.max(Duration::from_millis(1));
        self.header_read_timeout = self.header_read_timeout.max(Duration::from_millis(1));
        self.max_connections = self.max_connections.max(1);
        self.max_days_per_batch = self.max_days_per_batch.max(1);
        self
    }

    /// The in-flight requests one tenant may hold when `tenants` tenants are served.
    pub fn tenant_share(&self, tenants: usize) -> usize {
        let all = self.max_inflight_requests.max(1);
        match self.max_inflight_per_tenant {
            0 if tenants > 1 => (all / 2).max(1),
            0 => all,
            n => n.min(all),
        }
    }

    /// The validation bounds shared with the consumers.
    pub fn limits(&self) -> Limits {
        Limits {
            max_readings: self.max_readings_per_request,
            max_future_ns: i64::try_from(self.max_future_skew.as_nanos()).unwrap_or(i64::MAX),
            max_days: self.max_days_per_batch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_binding::Partitioning;

    #[test]
    fn defaults() {
        let c = IngestConfig::default();
        assert_eq!(c.batch_max_readings, 1000);
        assert_eq!(c.batch_linger, Duration::from_millis(5));
        assert_eq!(c.max_body_bytes, 8 << 20);
        assert_eq!(c.max_readings_per_request, 100_000);
        assert_eq!(c.max_inflight_requests, 1024);
        assert_eq!(c.max_inflight_batches, 256);
        assert_eq!(c.body_read_timeout, Duration::from_secs(10));
        assert_eq!(
            (c.tenant_share(1), c.tenant_share(2), c.tenant_share(9)),
            (1024, 512, 512)
        );
        let pinned = IngestConfig {
            max_inflight_per_tenant: 2000,
            ..IngestConfig::default()
        };
        assert_eq!(pinned.tenant_share(3), 1024, "never above the whole");
        assert_eq!(c.limits().max_future_ns, 3_600_000_000_000);
        assert_eq!(c.check(), Ok(()));
        // An empty file is the default configuration.
        let empty: IngestConfig = toml::from_str("").unwrap();
        assert_eq!(empty.batch_max_readings, 1000);
    }

    #[test]
    fn parses_every_field() {
        let c: IngestConfig = toml::from_str(
            r#"
            batch_max_readings = 500
            batch_linger = "20ms"
            max_body_bytes = 1048576
            max_readings_per_request = 10
            max_inflight_requests = 8
            max_inflight_per_tenant = 3
            body_read_timeout = "2s"
            header_read_timeout = "3s"
            max_connections = 100
            max_inflight_batches = 4
            retry_after_secs = 3
            max_future_skew = "10m"
            [producer]
            producer_id = "edge-1"
            partitioning = "device-hash"
            retries = 1
            retry_backoff = "50ms"
            "#,
        )
        .unwrap();
        assert_eq!(c.batch_max_readings, 500);
        assert_eq!(c.batch_linger, Duration::from_millis(20));
        assert_eq!(c.max_future_skew, Duration::from_secs(600));
        assert_eq!(c.retry_after_secs, 3);
        assert_eq!(c.tenant_share(5), 3);
        assert_eq!(c.body_read_timeout, Duration::from_secs(2));
        assert_eq!(c.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.producer.partitioning, Partitioning::DeviceHash);
        assert_eq!(c.producer.producer_id, "edge-1");
    }

    #[test]
    fn refuses_unknown_fields_bad_durations_and_ranges() {
        let e = toml::from_str::<IngestConfig>("batch_size = 3").unwrap_err();
        assert!(e.to_string().contains("unknown field `batch_size`"), "{e}");
        let e = toml::from_str::<IngestConfig>("batch_linger = \"soon\"").unwrap_err();
        assert!(e.to_string().contains("invalid duration \"soon\""), "{e}");
        let c = IngestConfig {
            batch_max_readings: 0,
            ..IngestConfig::default()
        };
        assert_eq!(c.check().unwrap_err().field, "batch_max_readings");
        assert_eq!(c.clamped().batch_max_readings, 1);
        let c = IngestConfig {
            batch_max_readings: 1_000_000,
            ..IngestConfig::default()
        };
        assert!(c.check().is_err());
        assert_eq!(c.clamped().batch_max_readings, MAX_BATCH_READINGS);
    }
}
