//! The producer: publishes batches in the binding format (`docs/binding.md`) and returns
//! only once the broker confirmed them. The HTTP front end sends through it, and so can
//! anyone who builds batches in Rust (loadgen `--target amqp`, embedded users).
//!
//! - Sequence numbers start at 0 and grow by one per [`Producer::batch`].
//! - The partition is picked once per batch (round robin, or `fnv1a64(device) mod P` for a
//!   single-device batch under device hash) and kept across retries.
//! - A batch that failed with a timeout, a connection error or a nack is published again
//!   with **the same bytes** (same batch id, which consumers deduplicate), up to
//!   [`ProducerConfig::retries`] more times with doubling backoff. A blocked broker, or no
//!   broker connected, is never retried (the caller answers 503 at once), nor is an
//!   unroutable message (a topology error that a retry does not fix).
//! - The producer does not run the consumer's validation rules on what it sends: the HTTP
//!   front end validated every reading before batching, and loadgen deliberately sends
//!   broken batches to exercise dead-lettering.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::codec::{self, EncodeError, MAX_MESSAGE_BYTES};
use crate::internal_events::{BatchPublished, PublishFailed};
use crate::model::{BatchBuilder, BatchView};
use crate::transport::{Outgoing, PublishError, Transport};
use crate::{Batch, Partitioner, Partitioning};
use serde::Deserialize;

/// Settings of a [`Producer`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// Producer id written into every batch (`producer`, AMQP `app_id`), 1–128 bytes.
    /// Defaults to `<hostname>-<8 random hex digits>` (`ingest-…` without a hostname).
    pub producer_id: String,
    /// How batches are spread over partitions: `"round-robin"` (default) or
    /// `"device-hash"` (every batch holds one device; per-device order).
    #[serde(with = "crate::config::partitioning")]
    pub partitioning: Partitioning,
    /// How many times a batch is published again, with the same bytes, after a confirm
    /// timeout, a connection error or a nack (default 2; 0 disables retries).
    pub retries: u32,
    /// Wait before the first retry; doubles for each further one, up to 5 s
    /// (humantime, default `"100ms"`).
    #[serde(with = "crate::config::duration")]
    pub retry_backoff: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            producer_id: default_producer_id(),
            partitioning: Partitioning::RoundRobin,
            retries: 2,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// Longest backoff between two retries.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// Longest producer id allowed by the binding.
const MAX_PRODUCER_ID_BYTES: usize = 128;

/// `<hostname or "ingest">-<8 random hex digits>`: unique per process, recognisable in
/// the RabbitMQ UI (`app_id`).
pub fn default_producer_id() -> String {
    let host = hostname()
        .map(|h| {
            h.chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ingest".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &random[..8])
}

fn hostname() -> Option<String> {
    if let Ok(h) = std::env::var("HOSTNAME") {
        return Some(h);
    }
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_owned())
}

/// Why a batch was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Device-hash partitioning needs batches of exactly one device.
    #[error("device-hash partitioning needs a batch of exactly one device; this one holds {0}")]
    NotSingleDevice(usize),
    /// The batch could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The encoded batch is larger than the binding allows.
    #[error("encoded batch of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte message limit")]
    TooLarge(usize),
    /// The broker did not confirm it (after `attempts` attempts).
    #[error("{source} (after {attempts} attempt(s))")]
    Publish {
        /// The last failure.
        source: PublishError,
        /// Attempts made, retries included.
        attempts: u32,
    },
}

impl SendError {
    /// A stable name for metrics: `blocked`, `unavailable`, `nacked`, `unroutable`,
    /// `timeout`, `connection`, `closed`, `not_single_device`, `encode`, `too_large`.
    pub fn kind(&self) -> &'static str {
        match self {
            SendError::NotSingleDevice(_) => "not_single_device",
            SendError::Encode(_) => "encode",
            SendError::TooLarge(_) => "too_large",
            SendError::Publish { source, .. } => source.kind(),
        }
    }

    /// Whether the batch was refused for what it is (a caller bug) rather than because the
    /// broker is unavailable; the HTTP front end answers 500 rather than 503 for these.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, SendError::Publish { .. })
    }
}

fn retryable(e: &PublishError) -> bool {
    matches!(
        e,
        PublishError::Timeout(_) | PublishError::Connection(_) | PublishError::Nacked
    )
}

/// Publishes batches with confirms; share it behind an `Arc` (every method takes `&self`,
/// and concurrent [`Producer::send`]s keep many confirms in flight).
#[derive(Debug)]
pub struct Producer {
    transport: Transport,
    partitioner: Partitioner,
    next_seq: AtomicU64,
    cfg: ProducerConfig,
}

impl Producer {
    /// A producer over `transport`, spreading over its topology's partitions. A
    /// `producer_id` that is empty or longer than 128 bytes is replaced by (or cut to)
    /// a valid one.
    pub fn new(transport: Transport, mut cfg: ProducerConfig) -> Self {
        if cfg.producer_id.is_empty() {
            cfg.producer_id = default_producer_id();
        }
        if cfg.producer_id.len() > MAX_PRODUCER_ID_BYTES {
            let mut end = MAX_PRODUCER_ID_BYTES;
            while !cfg.producer_id.is_char_boundary(end) {
                end -= 1;
            }
            cfg.producer_id.truncate(end);
        }
        let partitions = transport.topology().partitions;
        Self {
            partitioner: Partitioner::new(cfg.partitioning, partitions),
            transport,
            next_seq: AtomicU64::new(0),
            cfg,
        }
    }

    /// The producer id written into every batch.
    pub fn id(&self) -> &str {
        &self.cfg.producer_id
    }

    /// The partitioning strategy.
    pub fn partitioning(&self) -> Partitioning {
        self.partitioner.strategy()
    }

    /// The transport published to.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Starts a batch for `tenant`, taking the next sequence number. The caller checks the
    /// tenant id (`TenantId`); consumers dead-letter batches with an invalid one.
    pub fn batch(&self, tenant: &str) -> BatchBuilder {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        BatchBuilder::new(tenant, &self.cfg.producer_id, seq)
    }

    /// Encodes `batch`, picks its partition and publishes it, returning once the broker
    /// confirmed it; retries the same bytes as described in the module docs.
    pub async fn send(&self, batch: &Batch) -> Result<(), SendError> {
        let device = match self.partitioner.strategy() {
            Partitioning::DeviceHash => match batch.devices.as_slice() {
                [only] => Some(only.as_str()),
                other => return Err(self.refuse(SendError::NotSingleDevice(other.len()))),
            },
            Partitioning::RoundRobin => None,
        };
        let body = codec::encode(batch).map_err(|e| self.refuse(e.into()))?;
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(self.refuse(SendError::TooLarge(body.len())));
        }
        let msg = Outgoing {
            partition: self.partitioner.pick(device),
            body: &body,
            batch_id: batch.id,
            producer: &batch.producer,
        };
        self.publish(msg, batch.d.len()).await
    }

    /// Publishes a batch someone else encoded, as it is (the same bytes, so the same id:
    /// a batch forwarded twice is stored once), to the partition this producer's strategy
    /// picks; returns once the broker confirmed it, retrying as [`Producer::send`] does.
    /// For ingest's gate, which forwards direct publishers' batches.
    pub async fn forward(&self, body: &[u8], view: &BatchView<'_>) -> Result<(), SendError> {
        let device = match self.partitioner.strategy() {
            Partitioning::DeviceHash => match view.devices.as_slice() {
                [only] => Some(*only),
                other => return Err(self.refuse(SendError::NotSingleDevice(other.len()))),
            },
            Partitioning::RoundRobin => None,
        };
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(self.refuse(SendError::TooLarge(body.len())));
        }
        let msg = Outgoing {
            partition: self.partitioner.pick(device),
            body,
            batch_id: view.id,
            producer: view.producer,
        };
        self.publish(msg, view.len()).await
    }

    async fn publish(&self, msg: Outgoing<'_>, readings: usize) -> Result<(), SendError> {
        let mut backoff = self.cfg.retry_backoff;
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            match self.transport.publish(msg).await {
                Ok(()) => {
                    BatchPublished {
                        readings,
                        confirm: started.elapsed(),
                    }
                    .emit();
                    return Ok(());
                }
                Err(e) => {
                    let will_retry = attempt <= self.cfg.retries && retryable(&e);
                    PublishFailed {
                        error: e.kind(),
                        detail: &e,
                        attempt,
                        will_retry,
                    }
                    .emit();
                    if !will_retry {
                        return Err(SendError::Publish {
                            source: e,
                            attempts: attempt,
                        });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }

    fn refuse(&self, e: SendError) -> SendError {
        PublishFailed {
            error: e.kind(),
            detail: &e,
            attempt: 0,
            will_retry: false,
        }
        .emit();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topology;
    use crate::codec::decode;
    use crate::transport::inproc::InProcessTransport;

    async fn transport() -> Transport {
        let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), 64));
        t.declare(&["storage"]).await.unwrap();
        t
    }

    fn cfg(partitioning: Partitioning) -> ProducerConfig {
        ProducerConfig {
            producer_id: "p-1".into(),
            partitioning,
            ..ProducerConfig::default()
        }
    }

    #[test]
    fn default_id_has_a_host_part_and_a_random_suffix() {
        let a = default_producer_id();
        let b = default_producer_id();
        assert_ne!(a, b);
        let (host, rand) = a.rsplit_once('-').unwrap();
        assert!(!host.is_empty());
        assert_eq!(rand.len(), 8);
        assert!(rand.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[tokio::test]
    async fn sequence_numbers_start_at_zero_and_round_robin_spreads() {
        let t = transport().await;
        let p = Producer::new(t.clone(), cfg(Partitioning::RoundRobin));
        for i in 0..4 {
            let mut b = p.batch("acme");
            b.push("d1", "temp", 1_763_762_399_000_000_000, f64::from(i));
            p.send(&b.finish(1)).await.unwrap();
        }
        let mut consumers = t.consume_group("storage", 16).await.unwrap();
        for (partition, c) in consumers.iter_mut().enumerate() {
            for expected_seq in [partition as u64, partition as u64 + 2] {
                let d = c.next().await.unwrap();
                let view = decode(&d.body).unwrap();
                assert_eq!(view.seq, expected_seq);
                assert_eq!(view.producer, "p-1");
                assert_eq!(view.tenant, "acme");
            }
        }
    }

    #[tokio::test]
    async fn device_hash_needs_one_device_and_picks_its_partition() {
        let t = transport().await;
        let p = Producer::new(t.clone(), cfg(Partitioning::DeviceHash));
        let mut b = p.batch("acme");
        b.push("d1", "temp", 1, 1.0);
        b.push("d2", "temp", 1, 1.0);
        let err = p.send(&b.finish(1)).await.unwrap_err();
        assert!(matches!(err, SendError::NotSingleDevice(2)), "{err}");
        assert!(err.is_permanent());

        let mut b = p.batch("acme");
        b.push("meter-1", "temp", 1, 1.0);
        p.send(&b.finish(1)).await.unwrap();
        let expected = crate::partition::fnv1a64(b"meter-1") % 2;
        let mut consumers = t.consume_group("storage", 16).await.unwrap();
        let d = consumers[expected as usize].next().await.unwrap();
        assert_eq!(decode(&d.body).unwrap().devices, ["meter-1"]);
    }

    #[tokio::test]
    async fn unroutable_is_not_retried() {
        // No group declared: every publish is unroutable.
        let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), 4));
        let p = Producer::new(
            t,
            ProducerConfig {
                retries: 5,
                ..cfg(Partitioning::RoundRobin)
            },
        );
        let mut b = p.batch("acme");
        b.push("d", "m", 1, 1.0);
        let err = p.send(&b.finish(1)).await.unwrap_err();
        assert!(
            matches!(
                err,
                SendError::Publish {
                    source: PublishError::Unroutable(0),
                    attempts: 1
                }
            ),
            "{err}"
        );
        assert_eq!(err.kind(), "unroutable");
        assert!(!err.is_permanent());
    }

    #[test]
    fn producer_ids_are_kept_valid() {
        let t = Transport::InProcess(InProcessTransport::new(Topology::new("t", 2), 4));
        let empty = Producer::new(
            t.clone(),
            ProducerConfig {
                producer_id: String::new(),
                ..ProducerConfig::default()
            },
        );
        assert!(!empty.id().is_empty());
        let long = Producer::new(
            t,
            ProducerConfig {
                producer_id: "é".repeat(100),
                ..ProducerConfig::default()
            },
        );
        assert_eq!(long.id().len(), 128);
    }

    #[test]
    fn config_parses_from_toml() {
        let c: ProducerConfig = toml::from_str(
            "producer_id = \"gw-1\"\npartitioning = \"device-hash\"\nretries = 0\nretry_backoff = \"250ms\"\n",
        )
        .unwrap();
        assert_eq!(c.producer_id, "gw-1");
        assert_eq!(c.partitioning, Partitioning::DeviceHash);
        assert_eq!(c.retries, 0);
        assert_eq!(c.retry_backoff, Duration::from_millis(250));
        let e = toml::from_str::<ProducerConfig>("partitioning = \"hash\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown partitioning"), "{e}");
        let e = toml::from_str::<ProducerConfig>("retry_backof = \"1s\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
