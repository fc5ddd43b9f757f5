//! `loadgen`: simulated devices pushing telemetry into Sluice over HTTP or straight to the
//! broker, reporting throughput and HDR latency percentiles (table, `.hgrm`, SVG plot).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use sluice_binding::partition::Partitioning;
use sluice_binding::shutdown;
use sluice_binding::telemetry;
use sluice_binding::topology::{QueueType, Topology};
use sluice_binding::transport::Transport;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};
use sluice_ingest::producer::{Producer, ProducerConfig};
use sluice_loadgen::run::{BodyFormat, LoadConfig, Target, run, write_outputs};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TargetKind {
    /// POST to the HTTP front end (`sluice ingest`).
    Http,
    /// Publish binding batches straight to RabbitMQ.
    Amqp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Msgpack,
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Push simulated IoT telemetry into Sluice and report throughput and latency.
///
/// The end-to-end latency (device timestamp → committed in storage) is measured from the
/// commit receipts storage publishes; it needs --amqp-url (the broker the processors use).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Cli {
    /// Where to send: the HTTP front end or the broker directly.
    #[arg(long, env = "LOADGEN_TARGET", value_enum, default_value_t = TargetKind::Http)]
    target: TargetKind,
    /// Base URL of the HTTP front end.
    #[arg(long, env = "LOADGEN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (HTTP target); the tenant is the key's.
    #[arg(long, env = "LOADGEN_API_KEY", default_value = "demo-key-change-me")]
    api_key: String,
    /// HTTP body encoding.
    #[arg(long, env = "LOADGEN_FORMAT", value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Broker URL(s), comma-separated: the target of --target amqp, and where commit
    /// receipts are read for the end-to-end latency. Empty: no end-to-end figure.
    #[arg(long, env = "LOADGEN_AMQP_URL", value_delimiter = ',')]
    amqp_url: Vec<String>,
    /// Namespace of the topology.
    #[arg(long, env = "LOADGEN_NAMESPACE", default_value = "sluice")]
    namespace: String,
    /// Partitions (must match the services).
    #[arg(long, env = "LOADGEN_PARTITIONS", default_value_t = 4)]
    partitions: u32,
    /// Partitioning of directly published batches.
    #[arg(long, env = "LOADGEN_PARTITIONING", default_value = "round-robin")]
    partitioning: Partitioning,
    /// Tenant of directly published batches, and whose commit receipts are counted.
    #[arg(long, env = "LOADGEN_TENANT", default_value = "demo")]
    tenant: String,
    /// Simulated devices.
    #[arg(long, env = "LOADGEN_DEVICES", default_value_t = 100)]
    devices: u32,
    /// Metrics per device.
    #[arg(long, env = "LOADGEN_METRICS", default_value_t = 2)]
    metrics: u32,
    /// Offered load in readings per second.
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 50_000.0)]
    rate: f64,
    /// Readings per request (or per batch with --target amqp).
    #[arg(long, env = "LOADGEN_BATCH_SIZE", default_value_t = 500)]
    batch_size: u32,
    /// How long to send.
    #[arg(long, env = "LOADGEN_DURATION", default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Stop after this many readings (before --duration if reached first).
    #[arg(long, env = "LOADGEN_COUNT")]
    count: Option<u64>,
    /// Requests outstanding at once.
    #[arg(long, env = "LOADGEN_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// Device name prefix.
    #[arg(long, env = "LOADGEN_DEVICE_PREFIX", default_value = "dev-")]
    device_prefix: String,
    /// Added to every value (values are deterministic; see the docs).
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 0)]
    seed: u64,
    /// How long to wait after sending for storage to commit everything accepted.
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT", default_value = "60s", value_parser = duration)]
    drain_timeout: Duration,
    /// Directory for summary.json, .hgrm files and latency.svg.
    #[arg(long, env = "LOADGEN_OUT", default_value = "results")]
    out: PathBuf,
    /// Print the summary as JSON on stdout (the table goes to stderr).
    #[arg(long, env = "LOADGEN_JSON")]
    json: bool,
    /// No live progress line.
    #[arg(long, env = "LOADGEN_QUIET")]
    quiet: bool,
    /// Log filter.
    #[arg(long, env = "LOADGEN_LOG", default_value = "warn")]
    log: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main_async(cli))
}

async fn main_async(cli: Cli) -> Result<()> {
    telemetry::init_tracing(&cli.log);
    let stop = shutdown::on_signal();
    let topology = Topology {
        namespace: cli.namespace.clone(),
        partitions: cli.partitions,
        queue_type: QueueType::default(),
    };
    let transport = if cli.amqp_url.is_empty() {
        None
    } else {
        let mut cfg = AmqpConfig::new(cli.amqp_url.clone(), topology);
        cfg.connection_name = "loadgen".to_owned();
        Some(Transport::Amqp(
            AmqpTransport::connect(cfg)
                .await
                .context("cannot connect to the broker")?,
        ))
    };
    let target = match cli.target {
        TargetKind::Http => Target::Http {
            url: cli.url.trim_end_matches('/').to_owned(),
            api_key: cli.api_key.clone(),
            format: match cli.format {
                Format::Json => BodyFormat::Json,
                Format::Msgpack => BodyFormat::Msgpack,
            },
        },
        TargetKind::Amqp => {
            let transport = transport
                .clone()
                .context("--target amqp needs --amqp-url")?;
            let cfg = ProducerConfig {
                partitioning: cli.partitioning,
                ..ProducerConfig::default()
            };
            Target::Direct(Arc::new(Producer::new(transport, cfg)))
        }
    };
    let receipts = match &transport {
        Some(t) => Some(t.subscribe_receipts(1024).await?),
        None => None,
    };
    let cfg = LoadConfig {
        devices: cli.devices,
        metrics: cli.metrics,
        rate: cli.rate,
        batch_size: cli.batch_size,
        duration: Some(cli.duration),
        count: cli.count,
        concurrency: cli.concurrency,
        tenant: cli.tenant.clone(),
        device_prefix: cli.device_prefix.clone(),
        seed: cli.seed,
        drain_timeout: cli.drain_timeout,
        progress: !cli.quiet,
    };
    let summary = run(cfg, target, receipts, stop).await?;
    if let Some(t) = &transport {
        t.close().await;
    }
    let files = write_outputs(&summary, &cli.out)?;
    eprintln!("{summary}");
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    if cli.json {
        println!("{}", summary.to_json()?);
    }
    Ok(())
}
