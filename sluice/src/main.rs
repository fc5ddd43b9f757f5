//! `sluice`: the command that runs every Sluice service. Each subcommand maps flags (each
//! with an environment variable) onto the config struct of a library crate and hands it
//! its resources and a shutdown signal; nothing else lives here.

mod args;
mod embedded;
mod workers;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sluice_binding::shutdown::{self, CancellationToken};
use sluice_binding::telemetry;
use sluice_binding::transport::Transport;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};
use sluice_sinks::table::TableConfig;

use crate::args::{
    BrokerArgs, IngestArgs, MaintainArgs, OpsArgs, ProcessArgs, QueryApiArgs, QueryArgs,
    RouterArgs, StoreCommand, WorkersArgs,
};

/// Sluice: a high-throughput ingestion pipeline for IoT telemetry on RabbitMQ, Arrow/Parquet
/// and Redis (ETSI TR 103 527).
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// HTTP front end: authenticate tenants, validate, batch, publish to the broker with
    /// publisher confirms (202 only after the broker confirmed).
    Ingest {
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Storage worker pool: consume the partitions, decode, validate, commit to the readings
    /// table (Delta Lake, local or S3) and Redis, then ack.
    Process {
        #[command(flatten)]
        process: ProcessArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Router: subscription API, matching of readings and derived events against
    /// subscriptions, oneM2M notification policies, and delivery by webhook, AMQP, Redis
    /// stream or live feed through a durable outbox.
    Router {
        #[command(flatten)]
        router: RouterArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// SQL over one tenant's stored readings (table `readings`: device, metric, ts, value,
    /// date).
    Query(QueryArgs),
    /// The read API for tenants: `POST /v1/query` (read-only SQL, answered as JSON rows or
    /// an Arrow IPC stream, within time, memory and size limits) and `GET /v1/latest` (the
    /// newest value per series from Redis), with the tenants' API keys (scope `query`).
    QueryApi {
        #[command(flatten)]
        api: QueryApiArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Maintenance of the readings table: per-tenant retention, compaction of small files,
    /// and vacuum of removed ones, a pass every --interval (one such service per
    /// deployment).
    Maintain {
        #[command(flatten)]
        maintain: MaintainArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Operations on the readings table's storage (`migrate`: convert the old layout).
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Show or change the worker count of a running `sluice process` (through its admin
    /// endpoint): `show`, `set N` (pins the count), `auto` (back to the autoscaler).
    Workers(WorkersArgs),
    /// The whole pipeline in one process, no broker or Redis needed: in-process transport,
    /// the readings table in a local directory, in-memory latest values. Pushes loadgen telemetry through the
    /// HTTP front end for a bounded time and prints the summary (or, with --serve, keeps
    /// serving until stopped).
    Embedded(Box<embedded::EmbeddedArgs>),
}

/// Errors end as one `error: …` line (with its causes) and exit status 1, not a debug dump.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Many library errors already quote their source
/// in their message; a cause already said is not said again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Maintain { maintain, .. } = &cli.command {
        // Before the runtime starts: Linux keeps a nice value per thread, and threads
        // inherit it from the thread that creates them.
        lower_priority(maintain.nice)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Ingest {
                ingest,
                broker,
                ops,
            } => run_ingest(ingest, broker, ops).await,
            Command::Process {
                process,
                broker,
                ops,
            } => run_process(process, broker, ops).await,
            Command::Router {
                router,
                broker,
                ops,
            } => run_router(router, broker, ops).await,
            Command::Query(q) => run_query(q).await,
            Command::QueryApi { api, ops } => run_query_api(api, ops).await,
            Command::Maintain { maintain, ops } => run_maintain(maintain, ops).await,
            Command::Store { action } => run_store(action).await,
            Command::Workers(w) => workers::run(w).await,
            Command::Embedded(e) => embedded::run(*e).await,
        }
    })
}

/// Lowers this process's CPU priority to `nice` (never raises it: that needs privileges).
fn lower_priority(nice: i32) -> Result<()> {
    use rustix::process::{getpriority_process, setpriority_process};
    let current = getpriority_process(None).context("cannot read the CPU priority")?;
    if nice > current {
        setpriority_process(None, nice)
            .with_context(|| format!("cannot lower the CPU priority to nice {nice}"))?;
    }
    Ok(())
}

fn start_ops(ops: &OpsArgs) -> Result<CancellationToken> {
    telemetry::init_tracing(&ops.log);
    if let Some(addr) = ops.metrics_listen.0 {
        telemetry::install_metrics(addr)?;
        tracing::info!(%addr, "serving /metrics");
    }
    Ok(shutdown::on_signal())
}

async fn connect(broker: &BrokerArgs, name: &str) -> Result<Transport> {
    Ok(Transport::Amqp(connect_amqp(broker, name).await?))
}

async fn connect_amqp(broker: &BrokerArgs, name: &str) -> Result<AmqpTransport> {
    let mut cfg = AmqpConfig::new(broker.amqp_url.clone(), broker.topology());
    cfg.confirm_timeout = broker.confirm_timeout;
    cfg.connect_timeout = broker.connect_timeout;
    cfg.connection_name = name.to_owned();
    cfg.trusted_users = broker.trusted_amqp_users.clone();
    Ok(AmqpTransport::connect(cfg).await?)
}

async fn run_ingest(args: IngestArgs, broker: BrokerArgs, ops: OpsArgs) -> Result<()> {
    let shutdown = start_ops(&ops)?;
    let tenants = sluice_binding::tenancy::Tenants::load(&args.tenants)
        .with_context(|| format!("cannot load tenants from {}", args.tenants.display()))?;
    let cfg = sluice_ingest::IngestConfig {
        max_days_per_batch: args.max_days_per_batch,
        ..args.batching.config()
    };
    cfg.check()?;
    let transport = connect(&broker, "sluice-ingest").await?;
    // Declare the storage group so batches accepted before any processor starts are kept.
    transport
        .declare(&[sluice_processors::PoolConfig::default().group.as_str()])
        .await?;
    let producer = sluice_binding::producer::Producer::new(transport.clone(), cfg.producer.clone());
    let state = sluice_ingest::http::AppState::new(cfg, tenants, producer);
    let gate_cfg = sluice_ingest::gate::GateConfig {
        max_backlog_bytes: args.gate_max_backlog_bytes,
        prefetch: args.gate_prefetch,
    };
    let gate = sluice_ingest::gate::Gate::start(state.clone(), gate_cfg).await?;
    let stop = shutdown.clone();
    let gate = tokio::spawn(gate.run(async move { stop.cancelled().await }));
    let listener = bind(args.listen).await?;
    let stop = shutdown.clone();
    let served =
        sluice_ingest::http::serve(listener, state, async move { stop.cancelled().await }).await;
    shutdown.cancel();
    let _ = gate.await;
    served?;
    transport.close().await;
    tracing::info!("ingest stopped");
    Ok(())
}

async fn run_process(args: ProcessArgs, broker: BrokerArgs, ops: OpsArgs) -> Result<()> {
    let shutdown = start_ops(&ops)?;
    let sinks = args.sinks().await?;
    let transport = connect(&broker, "sluice-process").await?;
    let mut cfg = args.pool_config();
    if let Some(path) = &args.tenants {
        let tenants = sluice_binding::tenancy::Tenants::load(path)
            .with_context(|| format!("cannot load tenants from {}", path.display()))?;
        cfg.tenants = Some(std::sync::Arc::new(tenants));
    }
    let control = sluice_processors::PoolControl::for_pool(&cfg);
    if let Some(addr) = args.admin_listen.0 {
        let listener = bind(addr).await?;
        let (app, stop) = (
            sluice_processors::admin::router(control.clone(), transport.clone()),
            shutdown.clone(),
        );
        tracing::info!(%addr, "serving the admin endpoint (/v1/workers, /livez, /readyz)");
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    let report = sluice_processors::run(transport.clone(), sinks, cfg, control, shutdown).await;
    transport.close().await;
    let report = report?;
    tracing::info!("storage pool stopped\n{}", report.summary());
    Ok(())
}

async fn run_router(args: RouterArgs, broker: BrokerArgs, ops: OpsArgs) -> Result<()> {
    let shutdown = start_ops(&ops)?;
    let tenants = sluice_binding::tenancy::Tenants::load(&args.tenants)
        .with_context(|| format!("cannot load tenants from {}", args.tenants.display()))?;
    let cfg = args.config()?;
    let transport = connect_amqp(&broker, "sluice-router").await?;
    let listener = match args.listen.0 {
        Some(addr) => {
            tracing::info!(%addr, "serving the subscription API");
            Some(bind(addr).await?)
        }
        None => None,
    };
    let result = sluice_router::run(transport.clone(), listener, tenants, cfg, shutdown).await;
    transport.close().await;
    result?;
    tracing::info!("router stopped");
    Ok(())
}

async fn run_maintain(args: MaintainArgs, ops: OpsArgs) -> Result<()> {
    let config = args.config()?;
    if args.once {
        telemetry::init_tracing(&ops.log);
        let table = args.table().await?;
        let report = sluice_processors::maintain::once(&table, &config.pass).await?;
        println!(
            "version {}: {} files; compacted {} into {}; {} partitions expired ({} files); {} files vacuumed",
            report.version,
            report.files_live,
            report.files_compacted,
            report.files_merged,
            report.partitions_expired.len(),
            report.files_expired,
            report.files_vacuumed
        );
        return Ok(());
    }
    let shutdown = start_ops(&ops)?;
    let table = args.table().await?;
    tracing::info!(store = %table.location(), interval = ?config.interval, "maintaining the readings table");
    let passes =
        sluice_processors::maintain::run(table, config, async move { shutdown.cancelled().await })
            .await;
    tracing::info!(passes, "maintenance stopped");
    Ok(())
}

async fn run_store(action: StoreCommand) -> Result<()> {
    telemetry::init_tracing("info");
    match action {
        StoreCommand::Migrate(store) => {
            let location = store.location()?;
            let root = location.local_root().with_context(|| {
                format!("{location}: the old layout was only ever written to local directories")
            })?;
            let report = sluice_sinks::legacy::migrate::migrate(
                &root,
                TableConfig {
                    store: store.store.clone(),
                    storage_options: store.options()?,
                    writer_id: "migrate".to_owned(),
                    ..TableConfig::default()
                },
            )
            .await
            .with_context(|| format!("converting {location}"))?;
            println!(
                "{location}: converted {} old files, {} rows stored ({} already stored by an earlier run)",
                report.files, report.rows_written, report.rows_skipped
            );
            Ok(())
        }
    }
}

async fn run_query(args: QueryArgs) -> Result<()> {
    telemetry::init_tracing("warn");
    let location = args.store.location()?;
    let q = sluice_sinks::query::TenantQuery::new(&location, &args.tenant)?;
    match args.format {
        args::Format::Table => println!("{}", q.sql_pretty(&args.sql).await?),
        args::Format::Json => {
            for row in q.sql_json(&args.sql).await? {
                println!("{}", serde_json::Value::Object(row));
            }
        }
    }
    Ok(())
}

async fn run_query_api(args: QueryApiArgs, ops: OpsArgs) -> Result<()> {
    let shutdown = start_ops(&ops)?;
    let tenants = sluice_binding::tenancy::Tenants::load(&args.tenants)
        .with_context(|| format!("cannot load tenants from {}", args.tenants.display()))?;
    let location = args.store.location()?;
    let latest = sluice_sinks::latest::LatestStore::Redis(
        sluice_sinks::latest::RedisLatest::connect(
            &args.redis.redis_url,
            args.redis.redis_prefix.clone(),
        )
        .await
        .with_context(|| {
            format!(
                "cannot connect to Redis at {}",
                sluice_binding::transport::amqp::redact(&args.redis.redis_url)
            )
        })?,
    );
    let state =
        sluice_query::AppState::new(args.limits.config(), tenants, location.clone(), latest)
            .context("cannot start the query runtime")?;
    let listener = bind(args.listen).await?;
    tracing::info!(store = %location, "serving the read API (POST /v1/query, GET /v1/latest)");
    sluice_query::serve(
        listener,
        state,
        sluice_binding::serve::ServerLimits::default(),
        async move { shutdown.cancelled().await },
    )
    .await?;
    tracing::info!("query API stopped");
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's flags are consistent (no name used twice by flattened groups):
    /// clap checks that only when a subcommand is parsed, so check them all here.
    #[test]
    fn every_subcommand_parses_its_flags() {
        super::Cli::command().debug_assert();
    }
}
