//! `worker-sweep`: storage throughput and stage/commit latency per worker count, on real
//! RabbitMQ (or, with `--in-process`, the embedded transport).
//!
//! For each count it queues the same backlog (`--messages` batches of `--readings`
//! readings, published with confirms before the pool starts), then runs a storage pool
//! with that many workers (autoscaling off) and times the drain: from the pool's start to
//! the commit receipt of the last row. Draining a prefilled backlog measures what the pool
//! can do, independent of how fast a producer offers. It prints a Markdown table and writes
//! an SVG plot (readings/s and stage p99 against workers).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use sluice_bench::{BrokerArg, scratch_sinks};
use sluice_binding::producer::{Producer, ProducerConfig};
use sluice_binding::shutdown::CancellationToken;
use sluice_binding::topology::Topology;
use sluice_binding::transport::Transport;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};
use sluice_binding::transport::inproc::InProcessTransport;
use sluice_processors::{PoolConfig, PoolControl};

/// Storage throughput per worker count.
#[derive(Debug, Parser)]
#[command(name = "worker-sweep", version)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArg,
    /// Use the in-process transport instead of RabbitMQ.
    #[arg(long)]
    in_process: bool,
    /// Worker counts to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    workers: Vec<usize>,
    /// Batches queued before each run.
    #[arg(long, default_value_t = 2_000)]
    messages: u64,
    /// Readings per batch.
    #[arg(long, default_value_t = 500)]
    readings: u32,
    /// Partition queues.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Prefetch per partition queue.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Where the SVG plot goes.
    #[arg(long, default_value = "bench/results/worker-sweep.svg")]
    plot: PathBuf,
}

struct Row {
    workers: usize,
    readings_per_s: f64,
    stage: Histogram<u64>,
    commit: Histogram<u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut rows = Vec::new();
    for &n in &cli.workers {
        let row = run_one(&cli, n)
            .await
            .with_context(|| format!("{n} workers"))?;
        eprintln!("{n} workers: {:.0} readings/s", row.readings_per_s);
        rows.push(row);
    }
    print_table(&cli, &rows);
    plot(&cli.plot, &rows)?;
    eprintln!("plot: {}", cli.plot.display());
    Ok(())
}

async fn transport(cli: &Cli, ns: &str) -> Result<Transport> {
    let topology = Topology::new(ns, cli.partitions);
    Ok(if cli.in_process {
        // Room for the whole backlog: it is queued before the pool starts.
        let capacity = usize::try_from(cli.messages)?.max(1);
        Transport::InProcess(InProcessTransport::new(topology, capacity))
    } else {
        Transport::Amqp(
            AmqpTransport::connect(AmqpConfig::new(vec![cli.broker.amqp_url.clone()], topology))
                .await?,
        )
    })
}

async fn run_one(cli: &Cli, workers: usize) -> Result<Row> {
    let ns = format!("sweep{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let transport = transport(cli, &ns).await?;
    transport.declare(&["storage"]).await?;
    let mut receipts = transport.subscribe_receipts(4096).await?;

    // Queue the backlog.
    let producer = Arc::new(Producer::new(transport.clone(), ProducerConfig::default()));
    let mut sends = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    for m in 0..cli.messages {
        let permit = in_flight.clone().acquire_owned().await?;
        let producer = producer.clone();
        let readings = cli.readings;
        sends.spawn(async move {
            let now = sluice_binding::model::now_ns();
            let mut b = producer.batch("bench");
            for r in 0..readings {
                let device = format!("dev-{:04}", (m * u64::from(readings) + u64::from(r)) % 1000);
                b.push(&device, "temp", now - i64::from(r), f64::from(r));
            }
            let res = producer.send(&b.finish(now)).await;
            drop(permit);
            res
        });
    }
    while let Some(r) = sends.join_next().await {
        r??;
    }

    let (_dir, sinks) = scratch_sinks().await?;
    let cfg = PoolConfig {
        workers,
        prefetch: cli.prefetch,
        ..PoolConfig::default()
    };
    let control = PoolControl::for_pool(&cfg);
    let stop = CancellationToken::new();
    let start = Instant::now();
    let pool = tokio::spawn(sluice_processors::run(
        transport.clone(),
        sinks,
        cfg,
        control,
        stop.clone(),
    ));
    let want = cli.messages * u64::from(cli.readings);
    let mut rows = 0;
    while rows < want {
        match tokio::time::timeout(Duration::from_secs(120), receipts.recv()).await {
            Ok(Some(r)) => rows += r.rows,
            Ok(None) => anyhow::bail!("receipts ended after {rows} rows"),
            Err(_) => anyhow::bail!("no commit for 120 s after {rows} rows"),
        }
    }
    let took = start.elapsed();
    stop.cancel();
    let report = pool.await??;
    transport.close().await;
    Ok(Row {
        workers,
        readings_per_s: rows as f64 / took.as_secs_f64(),
        stage: report.stage,
        commit: report.commit,
    })
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

fn print_table(cli: &Cli, rows: &[Row]) {
    let transport = if cli.in_process {
        "in-process"
    } else {
        "RabbitMQ"
    };
    println!(
        "{transport}, {} batches × {} readings, {} partitions, prefetch {}\n",
        cli.messages, cli.readings, cli.partitions, cli.prefetch
    );
    println!(
        "| workers | readings/s | stage p50 ms | stage p99 ms | commit p50 ms | commit p99 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.workers,
            r.readings_per_s,
            ms(&r.stage, 0.5),
            ms(&r.stage, 0.99),
            ms(&r.commit, 0.5),
            ms(&r.commit, 0.99),
        );
    }
}

fn plot(path: &PathBuf, rows: &[Row]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_w = rows.iter().map(|r| r.workers).max().unwrap_or(1) as f64;
    let max_rate = rows.iter().map(|r| r.readings_per_s).fold(1.0, f64::max) / 1e6;
    let max_p99 = rows.iter().map(|r| ms(&r.stage, 0.99)).fold(0.1, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Storage pool: throughput and stage p99 by worker count",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.5..max_w + 0.5, 0.0..max_rate * 1.15)?
        .set_secondary_coord(0.5..max_w + 0.5, 0.0..max_p99 * 1.15);
    chart
        .configure_mesh()
        .x_desc("workers")
        .y_desc("million readings/s")
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("stage p99 (ms)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            rows.iter()
                .map(|r| (r.workers as f64, r.readings_per_s / 1e6)),
            BLUE.stroke_width(2),
        ))?
        .label("readings/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_secondary_series(LineSeries::new(
            rows.iter().map(|r| (r.workers as f64, ms(&r.stage, 0.99))),
            RED.stroke_width(2),
        ))?
        .label("stage p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
