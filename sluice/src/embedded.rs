//! `sluice embedded`: the whole pipeline in one process — the HTTP front end, the in-process
//! transport in place of the broker, the storage pool on local Parquet files, latest values
//! in memory (or Redis) — driven by loadgen through the real HTTP path for a bounded time.
//! The same library code as the separate services; only the transport differs.

use std::path::PathBuf;
use std::time::Duration;

use crate::args::OptionalAddr;
use anyhow::{Context, Result};
use clap::Args;
use sluice_binding::model::TenantId;
use sluice_binding::producer::Producer;
use sluice_binding::shutdown::{self, CancellationToken};
use sluice_binding::telemetry;
use sluice_binding::tenancy::Tenants;
use sluice_binding::topology::Topology;
use sluice_binding::transport::Transport;
use sluice_binding::transport::inproc::InProcessTransport;
use sluice_ingest::http::{AppState, serve_with};
use sluice_loadgen::run::{BodyFormat, LoadConfig, Target, run as run_load, write_outputs};
use sluice_processors::Sinks;
use sluice_sinks::latest::{LatestStore, RedisLatest};

use crate::args::{BatchingArgs, PoolArgs, QueryLimitArgs};

/// Tenant and key of the embedded mode when no tenants file is given.
const DEMO_TENANT: &str = "demo";
const DEMO_KEY: &str = "demo-key-change-me";

/// `sluice embedded` flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct EmbeddedArgs {
    /// HTTP listen address (port 0: any free port).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Tenants file; without it one tenant `demo` with API key `demo-key-change-me`.
    #[arg(long, env = "SLUICE_TENANTS")]
    tenants: Option<PathBuf>,
    /// Redis URL for latest values; without it they are kept in memory.
    #[arg(long, env = "SLUICE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of the Redis keys.
    #[arg(long, env = "SLUICE_REDIS_PREFIX", default_value = "sluice")]
    redis_prefix: String,
    /// Latest-value series a tenant keeps at most (0: no cap); the readings of new series
    /// past it are stored in the table all the same.
    #[arg(long, env = "SLUICE_MAX_LATEST_SERIES", default_value_t = sluice_sinks::latest::DEFAULT_MAX_SERIES_PER_TENANT)]
    max_latest_series: u64,
    /// Partitions of the in-process transport.
    #[arg(long, env = "SLUICE_PARTITIONS", default_value_t = 4)]
    partitions: u32,
    /// Messages each in-process partition queue holds before publishers wait.
    #[arg(long, env = "SLUICE_QUEUE_CAPACITY", default_value_t = 1024)]
    queue_capacity: usize,
    /// Serve until stopped (Ctrl-C / SIGTERM) instead of running loadgen.
    #[arg(long, env = "SLUICE_SERVE")]
    serve: bool,
    /// Address of the Prometheus `/metrics` listener; empty to disable.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "")]
    metrics_listen: OptionalAddr,
    /// Log filter.
    #[arg(long, env = "SLUICE_LOG", default_value = "warn")]
    log: String,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    batching: BatchingArgs,
    #[command(flatten)]
    query: QueryLimitArgs,
    /// Load: how long loadgen sends.
    #[arg(long = "duration", env = "SLUICE_LOAD_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    load_duration: Duration,
    /// Load: stop after this many readings.
    #[arg(long = "count", env = "SLUICE_LOAD_COUNT")]
    load_count: Option<u64>,
    /// Load: offered readings per second.
    #[arg(long = "rate", env = "SLUICE_LOAD_RATE", default_value_t = 100_000.0)]
    load_rate: f64,
    /// Load: simulated devices.
    #[arg(long = "devices", env = "SLUICE_LOAD_DEVICES", default_value_t = 100)]
    load_devices: u32,
    /// Load: metrics per device.
    #[arg(long = "metrics", env = "SLUICE_LOAD_METRICS", default_value_t = 2)]
    load_metrics: u32,
    /// Load: readings per HTTP request.
    #[arg(
        long = "batch-size",
        env = "SLUICE_LOAD_BATCH_SIZE",
        default_value_t = 500
    )]
    load_batch_size: u32,
    /// Load: requests outstanding at once.
    #[arg(
        long = "concurrency",
        env = "SLUICE_LOAD_CONCURRENCY",
        default_value_t = 32
    )]
    load_concurrency: usize,
    /// Load: send MessagePack bodies instead of JSON.
    #[arg(long = "msgpack", env = "SLUICE_LOAD_MSGPACK")]
    load_msgpack: bool,
    /// Directory for summary.json, .hgrm files, latency.svg and timeline.csv.
    #[arg(long, env = "SLUICE_OUT", default_value = "results")]
    out: PathBuf,
    /// Print the loadgen summary as JSON on stdout.
    #[arg(long, env = "SLUICE_JSON")]
    json: bool,
}

pub(crate) async fn run(args: EmbeddedArgs) -> Result<()> {
    telemetry::init_tracing(&args.log);
    if let Some(addr) = args.metrics_listen.0 {
        telemetry::install_metrics(addr)?;
    }
    let signal = shutdown::on_signal();
    let topology = Topology::new("sluice", args.partitions);
    let transport = Transport::InProcess(InProcessTransport::new(topology, args.queue_capacity));
    let group = "storage";
    transport.declare(&[group]).await?;

    let latest = match &args.redis_url {
        Some(url) => {
            LatestStore::Redis(RedisLatest::connect(url, args.redis_prefix.clone()).await?)
        }
        None => LatestStore::memory(),
    }
    .with_max_series_per_tenant(args.max_latest_series);
    let sinks = Sinks {
        table: args.pool.table().await?,
        latest: latest.clone(),
    };
    let store_shown = sinks.table.location().to_string();
    let sinks_location = sinks.table.location().clone();
    let pool_stop = CancellationToken::new();
    let pool_cfg = args.pool.pool_config(group);
    let control = sluice_processors::PoolControl::for_pool(&pool_cfg);
    let pool = tokio::spawn(sluice_processors::run(
        transport.clone(),
        sinks,
        pool_cfg,
        control,
        pool_stop.clone(),
    ));

    let (tenants, api_key, tenant) = match &args.tenants {
        Some(path) => {
            let t =
                Tenants::load(path).with_context(|| format!("cannot load {}", path.display()))?;
            (t, None, None)
        }
        None => (
            Tenants::single(TenantId::new(DEMO_TENANT)?, &[DEMO_KEY]),
            Some(DEMO_KEY.to_owned()),
            Some(DEMO_TENANT.to_owned()),
        ),
    };
    let cfg = sluice_ingest::IngestConfig {
        max_days_per_batch: args.pool.max_days_per_batch,
        ..args.batching.config()
    };
    cfg.check()?;
    let producer = Producer::new(transport.clone(), cfg.producer.clone());
    let reads =
        sluice_query::AppState::new(args.query.config(), tenants.clone(), sinks_location, latest)
            .context("cannot start the query runtime")?;
    let state = AppState::new(cfg, tenants, producer);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let ingest_stop = CancellationToken::new();
    let stop = ingest_stop.clone();
    let ingest = tokio::spawn(serve_with(
        listener,
        state,
        sluice_query::routes(reads),
        async move { stop.cancelled().await },
    ));
    eprintln!(
        "sluice embedded: ingest (POST /v1/telemetry) and reads (POST /v1/query, GET /v1/latest) on http://{addr}, readings table in {}",
        store_shown
    );

    let summary = if args.serve {
        signal.cancelled().await;
        None
    } else {
        let (Some(api_key), Some(tenant)) = (api_key, tenant) else {
            anyhow::bail!(
                "the load run needs the built-in demo tenant: drop --tenants, or use --serve"
            );
        };
        let load = LoadConfig {
            devices: args.load_devices,
            metrics: args.load_metrics,
            rate: args.load_rate,
            batch_size: args.load_batch_size,
            duration: Some(args.load_duration),
            count: args.load_count,
            concurrency: args.load_concurrency,
            tenant,
            progress: !args.json,
            ..LoadConfig::default()
        };
        let target = Target::Http {
            url: format!("http://{addr}"),
            api_key,
            format: if args.load_msgpack {
                BodyFormat::Msgpack
            } else {
                BodyFormat::Json
            },
        };
        let receipts = transport.subscribe_receipts(1024).await?;
        Some(run_load(load, target, Some(receipts), signal.clone()).await?)
    };

    // Stop in data-path order: the front end (flushing its batcher and confirms), then the
    // pool (draining, committing and acking what it received).
    ingest_stop.cancel();
    ingest.await??;
    pool_stop.cancel();
    let report = pool.await??;
    eprintln!("\nstorage pool\n{}", report.summary());
    if let Some(summary) = summary {
        let files = write_outputs(&summary, &args.out)?;
        eprintln!("{summary}");
        for f in files {
            eprintln!("wrote {}", f.display());
        }
        eprintln!(
            "query it: sluice query --store {} --tenant {DEMO_TENANT} \"SELECT count(*) FROM readings\"",
            args.pool.store.store
        );
        if args.json {
            println!("{}", summary.to_json()?);
        }
    }
    Ok(())
}
