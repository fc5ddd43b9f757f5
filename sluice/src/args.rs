//! Command-line flags. Every flag has an environment variable (`SLUICE_…`), which is how
//! `compose.yaml` configures the services; `sluice <command> --help` lists them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use sluice_binding::partition::Partitioning;
use sluice_binding::tenancy::{Retention, Tenants};
use sluice_binding::topology::{QueueType, Topology};
use sluice_binding::transport::amqp::redact;
use sluice_binding::validate::Limits;
use sluice_ingest::config::IngestConfig;
use sluice_processors::autoscale::{AutoscaleConfig, Target};
use sluice_processors::maintain::MaintainConfig;
use sluice_processors::{PoolConfig, Sinks};
use sluice_sinks::latest::{LatestStore, RedisLatest};
use sluice_sinks::table::maintain::{Keep, MaintenanceConfig};
use sluice_sinks::table::pace::IoBudget;
use sluice_sinks::table::{Location, ReadingsTable, TableConfig};

/// Where the broker is and how the topology is shaped.
#[derive(Debug, Clone, Args)]
pub(crate) struct BrokerArgs {
    /// AMQP broker URL. Give several (comma-separated) to spread batches round robin over
    /// brokers and consume from all of them.
    #[arg(
        long = "amqp-url",
        env = "SLUICE_AMQP_URL",
        hide_env_values = true,
        value_delimiter = ',',
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) amqp_url: Vec<String>,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "SLUICE_NAMESPACE", default_value = "sluice")]
    pub(crate) namespace: String,
    /// Partition queues per consumer group; producers and consumers must agree.
    #[arg(long, env = "SLUICE_PARTITIONS", default_value_t = 4)]
    pub(crate) partitions: u32,
    /// Queue type of the partition and dead-letter queues: quorum (replicated) or classic.
    #[arg(long, env = "SLUICE_QUEUE_TYPE", default_value = "quorum")]
    pub(crate) queue_type: QueueType,
    /// How long a publish waits for the broker's confirm before it counts as failed.
    #[arg(long, env = "SLUICE_CONFIRM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) confirm_timeout: Duration,
    /// How long to keep retrying the first connection to a broker (it may start later).
    #[arg(long, env = "SLUICE_CONNECT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,
    /// Declare the partition queues single-active-consumer: of several processes consuming
    /// a partition, one at a time receives, so each partition is processed in order (with
    /// device-hash partitioning: per-device order). A queue's arguments are fixed when it
    /// is first declared; every service of a deployment must agree on this flag.
    #[arg(long, env = "SLUICE_SINGLE_ACTIVE_CONSUMER")]
    pub(crate) single_active_consumer: bool,
    /// Bound of each dead-letter queue, bytes of bodies (0: unbounded); past it the broker
    /// drops the oldest dead letters. Fixed when a queue is first declared; one declared
    /// before with other arguments is kept (with a warning) and bounded by a policy.
    #[arg(long, env = "SLUICE_DEAD_LETTER_MAX_BYTES", default_value_t = sluice_binding::topology::DEFAULT_DEAD_LETTER_MAX_BYTES)]
    pub(crate) dead_letter_max_bytes: u64,
    /// Broker users (comma-separated), besides the one of --amqp-url, that Sluice's own
    /// services log in as: their batches may carry any tenant. Every other publisher is
    /// held to its tenant's `amqp_users` in the tenants file.
    #[arg(long, env = "SLUICE_TRUSTED_AMQP_USERS", value_delimiter = ',')]
    pub(crate) trusted_amqp_users: Vec<String>,
}

impl BrokerArgs {
    pub(crate) fn topology(&self) -> Topology {
        Topology {
            namespace: self.namespace.clone(),
            partitions: self.partitions,
            queue_type: self.queue_type,
            single_active_consumer: self.single_active_consumer,
            dead_letter_max_bytes: self.dead_letter_max_bytes,
        }
    }
}

/// Logs and metrics.
#[derive(Debug, Clone, Args)]
pub(crate) struct OpsArgs {
    /// Address of the Prometheus `/metrics` listener; empty to disable.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub(crate) metrics_listen: OptionalAddr,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `sluice_processors=debug,info`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub(crate) log: String,
}

/// A listen address that an empty string turns off. A newtype rather than
/// `Option<SocketAddr>`, because clap reads `Option<T>` as "flag may be absent" and would
/// then have no way to say "present but disabled".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionalAddr(pub(crate) Option<SocketAddr>);

impl std::str::FromStr for OptionalAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            Ok(Self(None))
        } else {
            s.trim().parse().map(|a| Self(Some(a)))
        }
    }
}

/// `sluice ingest` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct IngestArgs {
    /// HTTP listen address.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:8080")]
    pub(crate) listen: SocketAddr,
    /// Tenants file (TOML): `[[tenant]] id = "..." api_keys = ["..."]`.
    #[arg(long, env = "SLUICE_TENANTS")]
    pub(crate) tenants: PathBuf,
    /// Most distinct UTC days the readings of one batch (or HTTP request) may fall on: storage
    /// writes a file per tenant and day a commit touches. Set it alike in ingest, process and
    /// router (the same variable), or batches one accepts are dead-lettered by another.
    #[arg(long, env = "SLUICE_MAX_DAYS_PER_BATCH", default_value_t = sluice_binding::validate::DEFAULT_MAX_DAYS)]
    pub(crate) max_days_per_batch: usize,
    /// Bytes of bodies each gated tenant's ingress queue holds (a tenant with a quota and
    /// `amqp_users`: its direct publishers go through ingest's gate, docs/binding.md
    /// section 6); past them the broker nacks the tenant's publishes. Fixed at the queue's
    /// first declaration.
    #[arg(long, env = "SLUICE_GATE_MAX_BACKLOG_BYTES", default_value_t = sluice_ingest::gate::GateConfig::default().max_backlog_bytes)]
    pub(crate) gate_max_backlog_bytes: u64,
    /// Forwards in flight per gated tenant and broker.
    #[arg(long, env = "SLUICE_GATE_PREFETCH", default_value_t = sluice_ingest::gate::GateConfig::default().prefetch)]
    pub(crate) gate_prefetch: u16,
    #[command(flatten)]
    pub(crate) batching: BatchingArgs,
}

/// Batching and limits of the HTTP front end (shared with `sluice embedded`).
#[derive(Debug, Clone, Args)]
pub(crate) struct BatchingArgs {
    /// round-robin (spread batches over partitions) or device-hash (per-device order).
    #[arg(long, env = "SLUICE_PARTITIONING", default_value = "round-robin")]
    pub(crate) partitioning: Partitioning,
    /// Readings per published batch, at most.
    #[arg(long, env = "SLUICE_BATCH_MAX_READINGS", default_value_t = 1000)]
    pub(crate) batch_max_readings: usize,
    /// Longest wait for a batch to fill before it is published anyway.
    #[arg(long, env = "SLUICE_BATCH_LINGER", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub(crate) batch_linger: Duration,
    /// Largest request body, in bytes (larger: 413).
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
    /// Requests in flight at once; beyond it requests get 503 with Retry-After at once.
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_REQUESTS", default_value_t = 1024)]
    pub(crate) max_inflight_requests: usize,
    /// Requests one tenant may have in flight at once (0: half of --max-inflight-requests
    /// with several tenants, all of it with one); beyond it that tenant gets 503.
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_PER_TENANT", default_value_t = 0)]
    pub(crate) max_inflight_per_tenant: usize,
    /// Longest a request body may take to arrive (slower: 408).
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) body_read_timeout: Duration,
    /// Longest a client may take to send a request's headers (slower: closed).
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) header_read_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog (keep below `ulimit -n`).
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub(crate) max_connections: usize,
    /// Batches awaiting broker confirms at once.
    #[arg(long, env = "SLUICE_MAX_INFLIGHT_BATCHES", default_value_t = 256)]
    pub(crate) max_inflight_batches: usize,
}

impl BatchingArgs {
    pub(crate) fn config(&self) -> IngestConfig {
        let mut cfg = IngestConfig {
            batch_max_readings: self.batch_max_readings,
            batch_linger: self.batch_linger,
            max_body_bytes: self.max_body_bytes,
            max_inflight_requests: self.max_inflight_requests,
            max_inflight_per_tenant: self.max_inflight_per_tenant,
            body_read_timeout: self.body_read_timeout,
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
            max_inflight_batches: self.max_inflight_batches,
            ..IngestConfig::default()
        };
        cfg.producer.partitioning = self.partitioning;
        cfg
    }
}

/// `sluice process` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct ProcessArgs {
    /// Consumer group whose partition queues this pool consumes.
    #[arg(long, env = "SLUICE_GROUP", default_value = "storage")]
    pub(crate) group: String,
    #[command(flatten)]
    pub(crate) pool: PoolArgs,
    /// Redis URL for latest values (e.g. redis://127.0.0.1:6379); without it they are kept
    /// in this process's memory.
    #[arg(long, env = "SLUICE_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// Prefix of the Redis keys.
    #[arg(long, env = "SLUICE_REDIS_PREFIX", default_value = "sluice")]
    pub(crate) redis_prefix: String,
    /// Latest-value series a tenant keeps at most (0: no cap); the readings of new series
    /// past it are stored in the table all the same.
    #[arg(long, env = "SLUICE_MAX_LATEST_SERIES", default_value_t = sluice_sinks::latest::DEFAULT_MAX_SERIES_PER_TENANT)]
    pub(crate) max_latest_series: u64,
    /// Address of the admin HTTP endpoint (`GET`/`PUT /v1/workers`, used by `sluice
    /// workers`); empty to disable. Operators only: keep it on a private address.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub(crate) admin_listen: OptionalAddr,
    /// Tenants file, for the broker users that publish batches directly (`amqp_users`).
    /// Without it only batches from Sluice's own broker users are stored; others are
    /// dead-lettered `forbidden`.
    #[arg(long, env = "SLUICE_TENANTS")]
    pub(crate) tenants: Option<PathBuf>,
}

/// Where the readings table lives (shared by `process`, `embedded` and `query`).
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreArgs {
    /// The readings table: a local directory, or an object store URL such as
    /// `s3://bucket/prefix` (S3 and S3-compatible servers). Every processor of a deployment
    /// writes the same table.
    #[arg(
        long = "store",
        visible_alias = "data-dir",
        env = "SLUICE_STORE",
        default_value = "data"
    )]
    pub(crate) store: String,
    /// An object store option, KEY=VALUE, repeatable: object_store's S3 names
    /// (`aws_endpoint=http://127.0.0.1:9000`, `aws_region`, `aws_allow_http=true`,
    /// `aws_access_key_id`, `aws_secret_access_key`, …). Unset ones are read from the usual
    /// `AWS_*` environment variables.
    #[arg(
        long = "store-option",
        env = "SLUICE_STORE_OPTIONS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub(crate) store_options: Vec<String>,
}

impl StoreArgs {
    /// The options as a map; a malformed one is an error naming it.
    pub(crate) fn options(&self) -> Result<BTreeMap<String, String>> {
        self.store_options
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').with_context(|| {
                    format!(
                        "--store-option {:?}: expected KEY=VALUE",
                        kv.split('=').next().unwrap_or_default()
                    )
                })?;
                Ok((k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect()
    }

    /// The parsed location (a local directory is created).
    pub(crate) fn location(&self) -> Result<Location> {
        Ok(Location::parse(&self.store, self.options()?)?)
    }
}

/// Worker pool and storage flags (shared with `sluice embedded`).
#[derive(Debug, Clone, Args)]
pub(crate) struct PoolArgs {
    /// Worker threads decoding, validating and building Arrow batches.
    #[arg(long, env = "SLUICE_WORKERS", default_value_t = 2)]
    pub(crate) workers: usize,
    /// Unacked deliveries per partition queue. Acks wait for the commit, so the window over
    /// all partitions should exceed one commit's messages.
    #[arg(long, env = "SLUICE_PREFETCH", default_value_t = 500)]
    pub(crate) prefetch: u16,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Two copies of a batch (a redelivery, a producer's retry) committed within this time of
    /// each other are stored once. Read from the table's log at start; costs about 40 bytes
    /// of memory per batch committed in the window.
    #[arg(long, env = "SLUICE_DEDUP_WINDOW", default_value = "15m", value_parser = humantime::parse_duration)]
    pub(crate) dedup_window: Duration,
    /// Commits in flight at once, each writing its own files and log entry; while one
    /// uploads, the next is encoded. More help while cores are idle and on object stores
    /// (whose writes take longer).
    #[arg(long, env = "SLUICE_COMMITTERS", default_value_t = 2)]
    pub(crate) committers: usize,
    /// Commit once this many rows are staged.
    #[arg(long, env = "SLUICE_FLUSH_ROWS", default_value_t = 100_000)]
    pub(crate) flush_rows: usize,
    /// Commit at the latest this long after the first staged row.
    #[arg(long, env = "SLUICE_FLUSH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) flush_interval: Duration,
    /// Commit before the staged batches touch more (tenant, UTC day) partitions than this: a
    /// commit writes a file per partition, and backfills spread over many days must not make
    /// the commit holding live readings write hundreds of files.
    #[arg(long, env = "SLUICE_FLUSH_PARTITIONS", default_value_t = 64)]
    pub(crate) flush_partitions: usize,
    /// ZSTD level of the table's Parquet files.
    #[arg(long, env = "SLUICE_ZSTD_LEVEL", default_value_t = 1)]
    pub(crate) zstd_level: i32,
    /// How far ahead of this clock a device timestamp may be.
    #[arg(long, env = "SLUICE_MAX_FUTURE_SKEW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) max_future_skew: Duration,
    /// Most distinct UTC days the readings of one batch (or HTTP request) may fall on: storage
    /// writes a file per tenant and day a commit touches. Set it alike in ingest, process and
    /// router (the same variable), or batches one accepts are dead-lettered by another.
    #[arg(long, env = "SLUICE_MAX_DAYS_PER_BATCH", default_value_t = sluice_binding::validate::DEFAULT_MAX_DAYS)]
    pub(crate) max_days_per_batch: usize,
    #[command(flatten)]
    pub(crate) autoscale: AutoscaleArgs,
}

/// The pool's built-in autoscaler (off unless `--autoscale`).
#[derive(Debug, Clone, Args)]
pub(crate) struct AutoscaleArgs {
    /// Let the pool scale its workers between --min-workers and --max-workers by the
    /// backlog of its partitions (--workers is then the count at start).
    #[arg(long, env = "SLUICE_AUTOSCALE")]
    pub(crate) autoscale: bool,
    /// Fewest workers when autoscaling.
    #[arg(long, env = "SLUICE_MIN_WORKERS", default_value_t = 1)]
    pub(crate) min_workers: usize,
    /// Most workers when autoscaling.
    #[arg(long, env = "SLUICE_MAX_WORKERS", default_value_t = 8)]
    pub(crate) max_workers: usize,
    /// Workers added or released per autoscaling decision.
    #[arg(long, env = "SLUICE_SCALE_STEP", default_value_t = 1)]
    pub(crate) scale_step: usize,
    /// No scale-down within this long of a change, and only after the target was met with
    /// a step fewer workers for this long.
    #[arg(long, env = "SLUICE_SCALE_COOLDOWN", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) scale_cooldown: Duration,
    /// How often the autoscaler samples the backlog (and the least time between two
    /// scale-ups).
    #[arg(long, env = "SLUICE_SCALE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) scale_interval: Duration,
    /// What the autoscaler keeps: `backlog:<ready messages per worker>` or
    /// `drain:<time to drain the backlog>`.
    #[arg(long, env = "SLUICE_SCALE_TARGET", default_value = "backlog:1000")]
    pub(crate) scale_target: Target,
    /// Scale up only while the workers were busy at least this fraction of the interval
    /// (0 to 1); a backlog that idle workers do not drain is a bottleneck further on.
    #[arg(long, env = "SLUICE_SCALE_MIN_BUSY", default_value_t = 0.5)]
    pub(crate) scale_min_busy: f64,
}

impl AutoscaleArgs {
    pub(crate) fn config(&self) -> Option<AutoscaleConfig> {
        self.autoscale.then_some(AutoscaleConfig {
            min: self.min_workers,
            max: self.max_workers,
            step: self.scale_step,
            cooldown: self.scale_cooldown,
            interval: self.scale_interval,
            target: self.scale_target,
            min_busy: self.scale_min_busy,
        })
    }
}

impl PoolArgs {
    pub(crate) fn pool_config(&self, group: &str) -> PoolConfig {
        PoolConfig {
            group: group.to_owned(),
            workers: self.workers,
            autoscale: self.autoscale.config(),
            prefetch: self.prefetch,
            committers: self.committers,
            flush_rows: self.flush_rows,
            flush_interval: self.flush_interval,
            flush_partitions: self.flush_partitions,
            limits: Limits {
                max_future_ns: self.max_future_skew.as_nanos() as i64,
                max_days: self.max_days_per_batch,
                ..Limits::default()
            },
            ..PoolConfig::default()
        }
    }

    pub(crate) async fn table(&self) -> Result<ReadingsTable> {
        let writer_id = std::env::var("HOSTNAME")
            .ok()
            .map(|h| {
                h.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .take(32)
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "sluice".to_owned());
        let cfg = TableConfig {
            zstd_level: self.zstd_level,
            writer_id,
            dedup_window: self.dedup_window,
            ..TableConfig::default()
        };
        open_table(&self.store, cfg).await
    }
}

impl ProcessArgs {
    pub(crate) fn pool_config(&self) -> PoolConfig {
        self.pool.pool_config(&self.group)
    }

    pub(crate) async fn sinks(&self) -> Result<Sinks> {
        let latest = match &self.redis_url {
            Some(url) => LatestStore::Redis(
                RedisLatest::connect(url, self.redis_prefix.clone())
                    .await
                    .with_context(|| format!("cannot connect to Redis at {}", redact(url)))?,
            ),
            None => {
                tracing::warn!("no --redis-url: latest values are kept in memory only");
                LatestStore::memory()
            }
        };
        Ok(Sinks {
            table: self.pool.table().await?,
            latest: latest.with_max_series_per_tenant(self.max_latest_series),
        })
    }
}

/// `sluice maintain` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct MaintainArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Run one pass and exit (status 1 if it failed) instead of one every --interval.
    #[arg(long)]
    pub(crate) once: bool,
    /// Time between the end of a pass and the start of the next.
    #[arg(long, env = "SLUICE_MAINTAIN_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub(crate) interval: Duration,
    /// Compaction merges each partition's files into files of about this many MiB.
    #[arg(long, env = "SLUICE_TARGET_FILE_MIB", default_value_t = 128)]
    pub(crate) target_file_mib: u64,
    /// Compaction merges today's files (still growing) into files of about this many MiB;
    /// a merged file below it is merged again at the next pass.
    #[arg(long, env = "SLUICE_OPEN_TARGET_FILE_MIB", default_value_t = 16)]
    pub(crate) open_target_file_mib: u64,
    /// Partitions compacted at once: at most this many cores busy with compaction.
    #[arg(long, env = "SLUICE_COMPACTION_TASKS", default_value_t = 1)]
    pub(crate) compaction_tasks: usize,
    /// Files removed from the table (by compaction or retention), and files no commit names,
    /// are deleted from storage this long after: longer than any query runs.
    #[arg(long, env = "SLUICE_VACUUM_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) vacuum_grace: Duration,
    /// Retention of tenants whose entry in --tenants sets none: a duration ("90d") or
    /// "forever". Whole UTC days entirely older than it are deleted.
    #[arg(long, env = "SLUICE_RETENTION", default_value = "forever")]
    pub(crate) retention: Retention,
    /// Tenants file, for each tenant's own `retention`.
    #[arg(long, env = "SLUICE_TENANTS")]
    pub(crate) tenants: Option<PathBuf>,
    /// ZSTD level of the merged files.
    #[arg(long, env = "SLUICE_ZSTD_LEVEL", default_value_t = 1)]
    pub(crate) zstd_level: i32,
    /// MiB a second a pass may read and write on the store (0: unlimited). Compaction is
    /// I/O work that would take it from ingest on the same machine or store.
    #[arg(long, env = "SLUICE_MAINTAIN_IO_MIB", default_value_t = 32)]
    pub(crate) io_mib_per_sec: u64,
    /// Store requests a second a pass may make: gets, puts, deletes, lists (0: unlimited).
    #[arg(long, env = "SLUICE_MAINTAIN_IO_REQUESTS", default_value_t = 400)]
    pub(crate) io_requests_per_sec: u32,
    /// CPU priority (nice value, 0 to 19) the process lowers itself to before it starts:
    /// compaction's decoding and encoding then takes only cores that ingest and storage
    /// leave idle. 0 keeps the priority it was started with.
    #[arg(long, env = "SLUICE_MAINTAIN_NICE", default_value_t = 19,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub(crate) nice: i32,
}

impl MaintainArgs {
    pub(crate) fn config(&self) -> Result<MaintainConfig> {
        let keep = |r: Retention| match r {
            Retention::Forever => Keep::Forever,
            Retention::For(d) => Keep::For(d),
        };
        let mut tenant_retention = BTreeMap::new();
        if let Some(path) = &self.tenants {
            let tenants = Tenants::load(path)
                .with_context(|| format!("cannot load tenants from {}", path.display()))?;
            for (tenant, r) in tenants.retentions() {
                tenant_retention.insert(tenant.as_str().to_owned(), keep(r));
            }
        }
        Ok(MaintainConfig {
            interval: self.interval,
            pass: MaintenanceConfig {
                target_file_size: self.target_file_mib.max(1) * 1024 * 1024,
                open_target_file_size: self.open_target_file_mib.max(1) * 1024 * 1024,
                max_concurrent_tasks: self.compaction_tasks.max(1),
                zstd_level: self.zstd_level,
                vacuum_grace: self.vacuum_grace,
                default_retention: keep(self.retention),
                tenant_retention,
                io_budget: IoBudget {
                    bytes_per_second: self.io_mib_per_sec.saturating_mul(1024 * 1024),
                    requests_per_second: self.io_requests_per_sec,
                },
            },
        })
    }

    pub(crate) async fn table(&self) -> Result<ReadingsTable> {
        open_table(&self.store, TableConfig::default()).await
    }
}

/// `sluice store` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum StoreCommand {
    /// Convert a directory written by Sluice before the Delta table (tenant=/date=/hour=
    /// Parquet files) into the readings table, in place. Safe to stop and run again: no
    /// row is stored twice, and an old file is deleted only once its rows are committed.
    Migrate(StoreArgs),
}

/// Opens the table at `store` with `config`'s other settings, with a clear error.
pub(crate) async fn open_table(store: &StoreArgs, config: TableConfig) -> Result<ReadingsTable> {
    let shown = store.location()?.to_string();
    ReadingsTable::open(TableConfig {
        store: store.store.clone(),
        storage_options: store.options()?,
        ..config
    })
    .await
    .with_context(|| format!("cannot open the readings table at {shown}"))
}

/// Output format of `sluice query`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    /// An aligned text table.
    Table,
    /// One JSON object per row, one per line.
    Json,
}

/// `sluice query` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct QueryArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The tenant whose data is queried; no other tenant's data is reachable.
    #[arg(long, env = "SLUICE_TENANT")]
    pub(crate) tenant: String,
    /// Output format.
    #[arg(long, env = "SLUICE_FORMAT", value_enum, default_value_t = Format::Table)]
    pub(crate) format: Format,
    /// The SQL query, e.g. "SELECT device, count(*) FROM readings GROUP BY device".
    pub(crate) sql: String,
}

/// A Redis the service needs (the router's, the read API's).
#[derive(Debug, Clone, Args)]
pub(crate) struct RedisArgs {
    /// Redis URL.
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub(crate) redis_url: String,
    /// Prefix of the Redis keys.
    #[arg(long, env = "SLUICE_REDIS_PREFIX", default_value = "sluice")]
    pub(crate) redis_prefix: String,
}

/// `sluice query-api` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct QueryApiArgs {
    /// HTTP listen address of the read API.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:8070")]
    pub(crate) listen: SocketAddr,
    /// Tenants file: API keys with the `query` scope may read their tenant's data.
    #[arg(long, env = "SLUICE_TENANTS")]
    pub(crate) tenants: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Redis, where `sluice process` keeps the latest values (`GET /v1/latest`).
    #[command(flatten)]
    pub(crate) redis: RedisArgs,
    #[command(flatten)]
    pub(crate) limits: QueryLimitArgs,
}

/// Bounds of every read (shared with `sluice embedded`); defaults from
/// `sluice_query::QueryApiConfig`.
#[derive(Debug, Clone, Args)]
pub(crate) struct QueryLimitArgs {
    /// Longest a query may run; then it is cancelled and answered 408.
    #[arg(long, env = "SLUICE_QUERY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) query_timeout: Duration,
    /// Memory (MiB) the sorts, aggregations and joins of one query may hold; beyond it 413.
    #[arg(long, env = "SLUICE_QUERY_MEMORY_MIB", default_value_t = 256)]
    pub(crate) query_memory_mib: usize,
    /// Most rows one query may return; more answers 413.
    #[arg(long, env = "SLUICE_QUERY_MAX_ROWS", default_value_t = 100_000)]
    pub(crate) query_max_rows: usize,
    /// Most MiB of results one query may return; more answers 413.
    #[arg(long, env = "SLUICE_QUERY_MAX_RESULT_MIB", default_value_t = 64)]
    pub(crate) query_max_result_mib: usize,
    /// Queries running at once in the process; more answer 503.
    #[arg(long, env = "SLUICE_MAX_QUERIES", default_value_t = 8)]
    pub(crate) max_queries: usize,
    /// Queries running at once per tenant; more answer 429.
    #[arg(long, env = "SLUICE_MAX_QUERIES_PER_TENANT", default_value_t = 2)]
    pub(crate) max_queries_per_tenant: usize,
    /// Threads queries execute on (0: one per core), apart from those serving HTTP.
    #[arg(long, env = "SLUICE_QUERY_THREADS", default_value_t = 0)]
    pub(crate) query_threads: usize,
}

impl QueryLimitArgs {
    pub(crate) fn config(&self) -> sluice_query::QueryApiConfig {
        sluice_query::QueryApiConfig {
            timeout: self.query_timeout,
            memory_limit: self.query_memory_mib << 20,
            max_result_rows: self.query_max_rows,
            max_result_bytes: self.query_max_result_mib << 20,
            max_concurrent_queries: self.max_queries,
            max_concurrent_per_tenant: self.max_queries_per_tenant,
            query_threads: self.query_threads,
            ..sluice_query::QueryApiConfig::default()
        }
    }
}

/// `sluice workers` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct WorkersArgs {
    /// Admin endpoint of the processors process to steer.
    #[arg(
        long,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:9091"
    )]
    pub(crate) admin_url: String,
    #[command(subcommand)]
    pub(crate) action: Option<WorkersAction>,
}

/// What `sluice workers` does; without one, it shows the state.
#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum WorkersAction {
    /// Show workers running, desired, mode and the autoscaler's last decision.
    Show,
    /// Run N workers and pin the count (the autoscaler stops deciding until `auto`).
    Set {
        /// Worker count (1 to 256).
        n: usize,
    },
    /// Hand the count back to the autoscaler.
    Auto,
}

/// `sluice router` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct RouterArgs {
    /// Address of the subscription API (`/v1/subscriptions`, live feeds); empty to run
    /// without it (matching and delivery only).
    #[arg(long, env = "SLUICE_ROUTER_LISTEN", default_value = "0.0.0.0:8090")]
    pub(crate) listen: OptionalAddr,
    /// Tenants file (TOML), the same as ingest's: API keys name the tenant.
    #[arg(long, env = "SLUICE_TENANTS")]
    pub(crate) tenants: PathBuf,
    /// Redis: subscriptions, rate-limit windows, expiration counters, live feeds and
    /// Redis-stream targets.
    #[command(flatten)]
    pub(crate) redis: RedisArgs,
    /// Notify queues of the outbox (fixed at their first declaration).
    #[arg(long, env = "SLUICE_NOTIFY_PARTITIONS", default_value_t = 4)]
    pub(crate) notify_partitions: u32,
    /// Most subscriptions per tenant.
    #[arg(long, env = "SLUICE_MAX_SUBSCRIPTIONS", default_value_t = 10_000)]
    pub(crate) max_subscriptions: usize,
    /// Unsettled telemetry batches per partition consumer of the match stage.
    #[arg(long, env = "SLUICE_MATCH_PREFETCH", default_value_t = 32)]
    pub(crate) match_prefetch: u16,
    /// Connections the subscription API keeps open at once; more wait in the listen backlog.
    #[arg(
        long = "max-connections",
        env = "SLUICE_ROUTER_MAX_CONNECTIONS",
        default_value_t = 4096
    )]
    pub(crate) api_max_connections: usize,
    /// Longest a client of the subscription API may take to send a request's headers
    /// (slower: closed).
    #[arg(long = "header-read-timeout", env = "SLUICE_ROUTER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) api_header_read_timeout: Duration,
    /// Live feeds (`/v1/subscriptions/{id}/live`) a tenant may hold open at once on this
    /// router; one more gets 429.
    #[arg(long, env = "SLUICE_MAX_LIVE_FEEDS", default_value_t = 16)]
    pub(crate) max_live_feeds: usize,
    /// How far ahead of this clock a device timestamp may be; set it as the storage pool's
    /// (the same variable), or batches storage keeps are dead-lettered here.
    #[arg(long, env = "SLUICE_MAX_FUTURE_SKEW", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) max_future_skew: Duration,
    /// Most distinct UTC days the readings of one batch (or HTTP request) may fall on: storage
    /// writes a file per tenant and day a commit touches. Set it alike in ingest, process and
    /// router (the same variable), or batches one accepts are dead-lettered by another.
    #[arg(long, env = "SLUICE_MAX_DAYS_PER_BATCH", default_value_t = sluice_binding::validate::DEFAULT_MAX_DAYS)]
    pub(crate) max_days_per_batch: usize,
    /// Unsettled jobs per notify queue of the delivery stage: the notifications decided
    /// and sent at once (held batches and pending notifications wait outside it).
    #[arg(long, env = "SLUICE_NOTIFY_PREFETCH", default_value_t = 512)]
    pub(crate) notify_prefetch: u16,
    /// Unsettled jobs one tenant may hold per notify queue; more wait on the delay queue
    /// (0: half of --notify-prefetch with several tenants, else all of it).
    #[arg(long, env = "SLUICE_NOTIFY_JOBS_PER_TENANT", default_value_t = 0)]
    pub(crate) jobs_per_tenant: usize,
    /// Notifications being delivered at once by this instance.
    #[arg(long, env = "SLUICE_NOTIFY_IN_FLIGHT", default_value_t = 256)]
    pub(crate) in_flight: usize,
    /// Notifications of one tenant being delivered at once (0: half of --in-flight with
    /// several tenants, else all of it).
    #[arg(long, env = "SLUICE_NOTIFY_IN_FLIGHT_PER_TENANT", default_value_t = 0)]
    pub(crate) in_flight_per_tenant: usize,
    /// Delivery attempts before a notification goes to the dead-letter queue.
    #[arg(long, env = "SLUICE_NOTIFY_MAX_ATTEMPTS", default_value_t = 8)]
    pub(crate) max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with jitter.
    #[arg(long, env = "SLUICE_NOTIFY_RETRY_INITIAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) retry_initial: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "SLUICE_NOTIFY_RETRY_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) retry_max: Duration,
    /// Timeout of one webhook request.
    #[arg(long, env = "SLUICE_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) webhook_timeout: Duration,
    /// Concurrent requests per webhook target (scheme, host and port).
    #[arg(long, env = "SLUICE_WEBHOOK_CONCURRENCY", default_value_t = 8)]
    pub(crate) webhook_concurrency: usize,
    /// Consecutive failures that open a target's circuit breaker.
    #[arg(long, env = "SLUICE_WEBHOOK_BREAKER_FAILURES", default_value_t = 5)]
    pub(crate) breaker_failures: u32,
    /// How long an open circuit stays open before one trial request.
    #[arg(long, env = "SLUICE_WEBHOOK_BREAKER_OPEN_FOR", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) breaker_open_for: Duration,
    /// Webhook targets allowed although loopback, private or link-local: IP addresses,
    /// CIDR networks or host names, comma-separated (e.g. `10.0.0.0/8,hooks.internal`).
    #[arg(long, env = "SLUICE_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub(crate) webhook_allow: Vec<String>,
}

impl RouterArgs {
    pub(crate) fn config(&self) -> Result<sluice_router::RouterConfig> {
        let mut allow = Vec::new();
        for a in self.webhook_allow.iter().filter(|a| !a.trim().is_empty()) {
            allow.push(
                a.trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--webhook-allow {a:?}: {e}"))?,
            );
        }
        let d = sluice_router::RouterConfig::default();
        Ok(sluice_router::RouterConfig {
            redis_url: self.redis.redis_url.clone(),
            redis_namespace: self.redis.redis_prefix.clone(),
            notify_partitions: self.notify_partitions,
            max_subscriptions_per_tenant: self.max_subscriptions,
            max_live_feeds_per_tenant: self.max_live_feeds,
            matching: sluice_router::MatchConfig {
                prefetch: self.match_prefetch,
                limits: Limits {
                    max_future_ns: self.max_future_skew.as_nanos() as i64,
                    max_days: self.max_days_per_batch,
                    ..Limits::default()
                },
                ..d.matching
            },
            deliver: sluice_router::DeliverConfig {
                prefetch: self.notify_prefetch,
                max_in_flight: self.in_flight,
                max_in_flight_per_tenant: self.in_flight_per_tenant,
                max_jobs_per_tenant: self.jobs_per_tenant,
                max_attempts: self.max_attempts,
                retry_initial: self.retry_initial,
                retry_max: self.retry_max,
                ..d.deliver
            },
            webhook: sluice_router::WebhookConfig {
                timeout: self.webhook_timeout,
                per_target_concurrency: self.webhook_concurrency,
                breaker_failures: self.breaker_failures,
                breaker_open_for: self.breaker_open_for,
                allow,
                ..d.webhook
            },
            api_limits: sluice_binding::serve::ServerLimits {
                max_connections: self.api_max_connections,
                header_read_timeout: self.api_header_read_timeout,
            },
            ..d
        })
    }
}
